"""The patched model on two GPUs: spread by ``device_map`` and tensor-parallel, each against one GPU.

Commands (a machine with 2 GPUs; nothing is downloaded: the model is random, built from a config):

    python benchmarks/e2e/multi_gpu.py --mode device_map
    torchrun --nproc_per_node 2 benchmarks/e2e/multi_gpu.py --mode tp

On a copy of the repository whose .git may be stale, set SPARSE_ATTN_HF_COMMIT=<commit> for the JSON's meta.
Each takes a few minutes (the first one also writes the random checkpoint, about 5.6 GB, to
``--checkpoint``, default /tmp/sparse_attn_hf_multi_gpu). Both write benchmarks/results/multi_gpu.json; each mode
replaces its own rows and keeps the other's, so run them one after the other in either order. The JSON is
rewritten after every stage: a run cut short keeps what it measured. The same on a CPU with a tiny model
(gloo, float32; writes to /tmp/sparse_attn_hf_multi_gpu_dry/ unless --out is given):

    python benchmarks/e2e/multi_gpu.py --mode device_map --dry-run
    torchrun --nproc_per_node 2 benchmarks/e2e/multi_gpu.py --mode tp --dry-run

Model: Llama-3-8B shape (32 query / 8 KV heads, head_dim 128, hidden 4096, vocabulary 128256) with 8 layers,
random bf16 weights, patched with half the KV heads streaming (random scores, seed 1; sink 128, local 1024,
decode window 256, token budget 1024, reuse 4), so on the 4K prompt streaming heads and decode page selection
both act. Modes:

* ``device_map``: ``from_pretrained(..., device_map="auto", max_memory=...)``, GPU 0 capped at about the
  embedding plus half the layers, so the layers split over the two GPUs (the placement is recorded; a model
  left on one GPU is an error).
* ``tp``: ``from_pretrained(..., tp_plan="auto")`` under torchrun: each rank holds 4 of the 8 KV heads.

Against the same checkpoint patched the same way on one GPU (in ``tp`` mode rank 0 runs it first while
rank 1 waits), each records: the max |logit difference| of a forward over a 4096-token random prompt
(and the same for stock Transformers, sdpa, as the yardstick of what the multi-GPU arithmetic alone changes
in bf16); greedy tokens on a 64-token prompt (32 new tokens) and on the 4K prompt (32 new tokens):
identical or not, where they first differ and the reference's top-2 logit margin there (random weights
give near-ties, which a reordered bf16 sum can flip: compare with the stock row); decode tokens/s
after the 4K prompt (median of 3 generate() calls, timestamps of the steps, prefill excluded), patched
and stock, on one GPU and on two.
"""

from __future__ import annotations

import os

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("NCCL_NVLS_ENABLE", "0"),
                      ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)  # no network; never NVLink multicast (shared hosts)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common.llama8b import llama8b_config  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model  # noqa: E402

LAYERS = 8
SPARSE = dict(streaming_fraction=0.5, sink_size=128, local_size=1024, decode_local_size=256, token_budget=1024,
              reuse_interval=4)
DRY_SPARSE = dict(streaming_fraction=0.5, sink_size=4, local_size=32, decode_local_size=8, page_size=16,
                  logical_page_size=4, token_budget=64, reuse_interval=4)
LONG, SHORT, NEW_TOKENS, ROUNDS = 4096, 64, 32, 3
DRY_LONG, DRY_SHORT, DRY_NEW = 160, 16, 8
OUT = RESULTS / "multi_gpu"


class Steps(LogitsProcessor):
    """Timestamps of generate()'s steps (one per new token, the first right after the prefill)."""

    def __init__(self, sync):
        self.times, self.sync = [], sync

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class Run:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.tp = args.mode == "tp"
        self.rank, self.world = 0, 1
        if self.tp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if self.world != 2:
                raise SystemExit(f"--mode tp expects torchrun --nproc_per_node 2, got WORLD_SIZE={self.world}.")
            if self.dry:
                dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
            else:
                local = int(os.environ.get("LOCAL_RANK", self.rank))
                torch.cuda.set_device(local)
                dist.init_process_group("nccl", device_id=torch.device("cuda", local),
                                        timeout=datetime.timedelta(minutes=20))
        elif not self.dry and torch.cuda.device_count() < 2:
            raise SystemExit(f"--mode device_map needs 2 GPUs, found {torch.cuda.device_count()}.")
        self.device = torch.device("cpu") if self.dry else torch.device("cuda", self.rank)
        self.dtype = torch.float32 if self.dry else getattr(torch, args.dtype)
        self.long, self.short, self.new = (DRY_LONG, DRY_SHORT, DRY_NEW) if self.dry else (LONG, SHORT, NEW_TOKENS)
        self.checkpoint = Path(args.checkpoint or ("/tmp/sparse_attn_hf_multi_gpu" + ("_dry" if self.dry else "")))
        default_out = Path("/tmp/sparse_attn_hf_multi_gpu_dry/multi_gpu") if self.dry else OUT
        self.out = Path(args.out) if args.out else default_out
        self.row = {"mode": args.mode, "gpus": 2, "dtype": str(self.dtype).replace("torch.", ""),
                    "layers": LAYERS if not self.dry else 2, "prompt_tokens": self.long,
                    "short_prompt_tokens": self.short, "new_tokens": self.new, "settings": self.settings(),
                    "kv_dtype": args.kv_dtype}

    # ------------------------------------------------------------------ helpers
    def settings(self) -> dict:
        return dict(DRY_SPARSE if self.dry else SPARSE)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[multi_gpu {self.args.mode}] {message}", flush=True)

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        if self.tp:
            dist.barrier()

    def config(self) -> LlamaConfig:
        if self.dry:
            return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=512)
        return llama8b_config(LAYERS, 8192)

    def ensure_checkpoint(self) -> None:
        """Rank 0 writes the random checkpoint and its profile once (seeded); the others wait."""
        ready = self.checkpoint / "READY"
        if self.rank == 0 and not ready.exists():
            self.log(f"writing a random checkpoint to {self.checkpoint}")
            torch.manual_seed(0)
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    model = LlamaForCausalLM(self.config()).eval()
            finally:
                torch.set_default_dtype(torch.float32)
            scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                                generator=torch.Generator().manual_seed(1))
            model.save_pretrained(self.checkpoint)
            Profile.from_scores(model, scores, **self.settings()).save(self.checkpoint / "profile.safetensors")
            self.free(model)
            ready.write_text("ok\n")
        self.barrier()

    def load(self, **kwargs):
        model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=self.dtype, **kwargs).eval()
        model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
        model.generation_config.pad_token_id = 0
        return model

    def prompts(self, vocab: int):
        generator = torch.Generator().manual_seed(2)
        long = torch.randint(3, vocab, (1, self.long), generator=generator)
        short = torch.randint(3, vocab, (1, self.short), generator=generator)
        return long, short

    def measure(self, model, input_device) -> dict:
        """Logits of the long prompt, greedy tokens (+ step logits) of both prompts, decode tokens/s."""
        long, short = (p.to(input_device) for p in self.prompts(model.config.vocab_size))
        with torch.no_grad():
            logits = model(long).logits[0]
        result = {"logits": logits}
        out = model.generate(short, max_new_tokens=self.new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        result["short_tokens"] = out.sequences[0, self.short:].cpu()
        result["short_step_logits"] = torch.stack(out.logits, dim=1)[0].float().cpu()
        rates = []
        for _ in range(ROUNDS):
            steps = Steps(self.sync)
            self.sync()
            out = model.generate(long, max_new_tokens=self.new, do_sample=False, logits_processor=LogitsProcessorList([steps]),
                                 output_logits=True, return_dict_in_generate=True)
            rates.append((len(steps.times) - 1) / (steps.times[-1] - steps.times[0]))
        result["long_tokens"] = out.sequences[0, self.long:].cpu()
        result["long_step_logits"] = torch.stack(out.logits, dim=1)[0].float().cpu()
        result["decode_tokens_per_s"] = statistics.median(rates)
        result["decode_tokens_per_s_rounds"] = rates
        return result

    def both(self, model, input_device) -> dict:
        """Stock (sdpa) first, then patched."""
        stock = self.measure(model, input_device)
        patch_model(model, self.checkpoint / "profile.safetensors", SparseConfig(kv_dtype=self.args.kv_dtype))
        try:
            patched = self.measure(model, input_device)
            state = model._sparse_attn_state
            patched["heads"] = [state.heads.start, state.heads.stop]
            patched["streaming_pairs"] = int(state.streaming.sum())
        finally:
            unpatch_model(model)
        return {"stock": stock, "patched": patched}

    def free(self, model) -> None:
        del model
        if not self.dry:
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- the stages
    def reference(self) -> dict | None:
        """The checkpoint on one device (rank 0 only)."""
        if self.rank != 0:
            return None
        self.log("one GPU: stock and patched" if not self.dry else "one process: stock and patched")
        model = self.load(device_map={"": self.device.index if self.device.type == "cuda" else "cpu"})
        result = self.both(model, self.device)
        self.free(model)
        return result

    def multi(self):
        if self.tp:
            self.log("tensor parallelism over 2 ranks: stock and patched")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # tp_plan= (the documented spelling) is deprecated
                model = self.load(tp_plan="auto")
            layout = {"tp_size": int(getattr(model, "_tp_size", None) or 0),
                      "k_proj_rows_per_rank": _local_rows(model.model.layers[0].self_attn.k_proj.weight)}
            return model, self.device, layout
        self.log("device_map='auto' over 2 GPUs: stock and patched")
        if self.dry:
            model = self.load(device_map="auto")
        else:
            model = self.load(device_map="auto", max_memory=self.max_memory())
        placement = getattr(model, "hf_device_map", {}) or {}
        layers = {}
        for name, where in placement.items():
            layers.setdefault(str(where), []).append(name)
        layout = {"placement": {k: len(v) for k, v in layers.items()}, "device_map": {k: str(v) for k, v in
                                                                                    placement.items()}}
        if not self.dry and len({str(v) for v in placement.values()}) < 2:
            raise RuntimeError(f"device_map did not split the model over two GPUs: {placement}")
        first = model.get_input_embeddings().weight.device
        return model, first, layout

    def max_memory(self) -> dict:
        """A cap for GPU 0: the embedding, half the layers, half a layer of margin, and the room accelerate keeps
        free on its first GPU for the largest layer (lm_head, as large as the embedding); GPU 1: the rest.
        device_map="auto" balances the GPUs by itself too (Transformers' get_balanced_memory): the smaller cap
        wins, and either way the layers split over both."""
        config = self.config()
        hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        kv = config.num_key_value_heads * config.head_dim
        size = self.dtype.itemsize  # bytes per weight
        layer = size * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden)
        embed = size * vocab * hidden
        gpu0 = 2 * embed + (LAYERS // 2) * layer + layer // 2
        return {0: gpu0, 1: 100 * 2**30}


def _local_rows(weight) -> int:
    return int((weight.to_local() if hasattr(weight, "to_local") else weight).shape[0])


def _first_difference(reference: torch.Tensor, other: torch.Tensor, step_logits: torch.Tensor) -> dict:
    same = torch.equal(reference, other)
    if same:
        return {"identical": True, "first_difference": None, "reference_top2_margin": None}
    index = int((reference != other).nonzero()[0, 0])
    top2 = step_logits[index].topk(2).values
    return {"identical": False, "first_difference": index, "reference_top2_margin": float(top2[0] - top2[1])}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.to(a.device)
    chunks = range(0, a.shape[0], 512)  # [L, vocab] in float32 at once would be 2 GB
    return max(float((a[i : i + 512].float() - b[i : i + 512].float()).abs().max()) for i in chunks)


def compare(single: dict, multi: dict) -> dict:
    row = {}
    for kind in ("stock", "patched"):
        ref, got = single[kind], multi[kind]
        row[f"{kind}_max_logit_diff"] = _max_diff(ref["logits"], got["logits"])
        row[f"{kind}_logit_scale"] = float(ref["logits"].float().abs().max())
        for prompt in ("short", "long"):
            diff = _first_difference(ref[f"{prompt}_tokens"], got[f"{prompt}_tokens"], ref[f"{prompt}_step_logits"])
            row.update({f"{kind}_{prompt}_tokens_{k}": v for k, v in diff.items()})
        row[f"{kind}_decode_tokens_per_s_one_gpu"] = ref["decode_tokens_per_s"]
        row[f"{kind}_decode_tokens_per_s_two_gpus"] = got["decode_tokens_per_s"]
        row[f"{kind}_decode_rounds_one_gpu"] = ref["decode_tokens_per_s_rounds"]
        row[f"{kind}_decode_rounds_two_gpus"] = got["decode_tokens_per_s_rounds"]
    # bf16: twice what the multi-GPU arithmetic changes in stock Transformers, or 1/32 of the largest logit
    tolerance = max(2 * row["stock_max_logit_diff"], row["patched_logit_scale"] / 32)
    row["patched_logit_tolerance"] = tolerance
    row["patched_within_tolerance"] = row["patched_max_logit_diff"] <= tolerance
    row["patched_heads_per_process"] = multi["patched"].get("heads")
    return row


def write(run: Run, row: dict) -> Path | None:
    """Merge this mode's row into the JSON (rank 0): the other mode's rows and meta are kept."""
    if run.rank != 0:
        return None
    path = run.out.with_suffix(".json")
    rows, runs = [], {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            rows = [r for r in old.get("rows", []) if _key(r) != _key(row)]
            runs = old.get("meta", {}).get("runs", {})
        except (OSError, ValueError):
            pass
    device = "cpu (dry run)" if run.dry else f"2x {torch.cuda.get_device_name(0)}"
    info = meta(device=device, dtype=row["dtype"], extra={"model": "Llama-3-8B shape, random weights, "
                                                                    f"{row['layers']} layers"})
    runs[" ".join(filter(None, _key(row)))] = {k: info[k] for k in ("commit", "dirty", "date", "command", "device",
                                                                     "packages")}
    info["runs"] = runs
    rows.append(row)
    rows.sort(key=_key)
    return write_results(run.out, info, rows)


def _key(row: dict) -> tuple:
    """What a row measured: mode, dtype and (FP8 pages) the page storage; a new run replaces only its own row."""
    kv = row.get("kv_dtype", "auto")
    return row["mode"], row["dtype"], "" if kv == "auto" else kv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("device_map", "tp"), required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (tp: gloo)")
    parser.add_argument("--checkpoint", help="folder of the random checkpoint (written when missing)")
    parser.add_argument("--out", help="results stem (default benchmarks/results/multi_gpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="float32 for the greedy-token check: random bf16 weights give exact top-2 ties")
    parser.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                        help="the dense heads' page storage (SparseConfig.kv_dtype) of the patched runs")
    args = parser.parse_args(argv)
    run = Run(args)
    row = dict(run.row)
    started = time.perf_counter()
    failed = False
    try:
        run.ensure_checkpoint()
        single = run.reference()
        if run.rank == 0:
            row["one_gpu_decode_tokens_per_s"] = {k: single[k]["decode_tokens_per_s"] for k in ("stock", "patched")}
            write(run, row)  # kept if the multi-GPU stage does not finish
        run.barrier()
        model, input_device, layout = run.multi()
        row.update(layout)
        multi = run.both(model, input_device)
        if run.rank == 0:
            row.update(compare(single, multi))
            if not run.dry:
                row["device"] = torch.cuda.get_device_name(0)
        run.free(model)
    except Exception as error:  # keep what was measured, say what broke
        failed = True
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - started, 1)
    path = write(run, row)
    if run.rank == 0:
        summary = {k: row.get(k) for k in ("mode", "patched_max_logit_diff", "stock_max_logit_diff",
                                             "patched_within_tolerance", "patched_short_tokens_identical",
                                             "stock_short_tokens_identical", "patched_long_tokens_identical",
                                             "patched_decode_tokens_per_s_one_gpu",
                                             "patched_decode_tokens_per_s_two_gpus", "error", "seconds")}
        print(json.dumps(summary), flush=True)
        print(f"wrote {path}", flush=True)
    if run.tp and not failed:  # after a failure, exit: torchrun ends the other rank
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
