"""What ``model.generate()`` gains: a full-depth Llama-3-8B-shaped model, one GPU, plain ``generate()``, against
stock Transformers timed in the same run. The project's headline benchmark.

    python benchmarks/e2e/bench_e2e.py --part core            # 8K / 32K / 128K at batch 1, 32K at batch 4 and 8
    python benchmarks/e2e/bench_e2e.py --part long            # 512K and 1M tokens with chunked prefill
    python benchmarks/e2e/bench_e2e.py --dry-run              # the bookkeeping on a tiny model, on the CPU
    python benchmarks/e2e/bench_e2e.py --family qwen3-8b --lengths 32768,131072 --batches ""   # another family's shape

``--family`` (``qwen3-8b``, ``gemma3-12b``: the text tower, ``gpt-oss-20b``; ``benchmarks/common/llama8b.py``) measures
that published model's full-size shape instead (its own depth, windows and experts; random weights) and writes
``benchmarks/results/e2e_families.json``: stock against ``patched_default`` unless ``--configs`` says otherwise.
``--structured`` gives the Llama-3-8B shape attention with structure (``llama8b.plant_columns``: every query head
puts most of its mass on four sink tokens per prompt, the rest diffuse), the input SampleAttention is for, and
writes ``benchmarks/results/e2e_structured.json``: stock, ``patched_streaming50`` and ``patched_default`` (does
SampleAttention run sparse inside ``generate()``, and what does it gain over streaming heads alone?).

Configurations (every patched one with LServe's settings: sink 128, local 4096, decode window 256, budget
4096, reuse 4; labels from ``Profile.from_scores`` with seeded scores; 50% streaming heads is DuoAttention's
published operating point for Llama-3-8B, not something measured here):

* ``stock``: sdpa + DynamicCache, what a user has;
* ``stock_static_compile``: Transformers' own fast path, ``cache_implementation="static"`` with its automatic
  decode compile (``compile_s``: the compile and capture time inside the first decode steps);
* ``patched_default``: 50% streaming heads, every other setting at the package's default (SampleAttention on,
  decode steps replayed from a CUDA graph: ``compile_s`` is the capture's wall time, ``graph_gib`` the memory
  the graph keeps, from ``sparse_attn_hf.decode_graph.last_capture``);
* ``patched_streaming50``: the same with SampleAttention off;
* ``patched_dense``: every head dense (page selection at the budget of 4096 in decode);
* ``patched_dense_exact``: every head dense and a token budget past every prompt: exact attention in prefill and
  decode, decode steps replayed from the graph. Against ``stock`` it isolates what the graph and the cache give
  without any sparsity;
* ``patched_sample_pinned``: ``patched_default`` with SampleAttention's stripe counts pinned so that each
  layer's mask has the density SampleAttention chose on real weights and real text
  (``benchmarks/results/sample_density.json``, the default model's layers mapped by depth onto these 32;
  the columns kept are still the ones stage 1 ranks first). Random weights cannot show what structure
  buys; this row replays measured structure at this shape. The cost model still decides per layer;
* ``patched_eager``: ``patched_default`` with every decode step eager (``SparseConfig(decode_graphs=False)``);
* ``patched_compile``: ``patched_default`` with Transformers' own decode compile in place of the CUDA graph
  (``SparseConfig(decode_compile=True)``; ``compile_s`` as for stock's compiled path);
* ``patched_bound_only``: ``patched_default`` with page selection by Quest's bound alone
  (``SparseConfig(shortlist=1)``): what the default's second stage (exact mass over a 4x short list) costs;
* ``patched_default_fp8``, ``patched_streaming50_fp8``: those configurations with the dense heads' sealed pages in
  FP8 (``SparseConfig(kv_dtype="fp8")``, issue 32).

Patched rows record SampleAttention's choices (``sample``: mean density, layers it ran sparse).

Per row: ``patch_s``, the configuration's ``patch_model`` (on CUDA its warm-up compiles the kernels: the cost moved
out of the first call); TTFT as the median of ``--repeats`` calls after a cold one (reported apart as ``ttft_cold_s``);
decode ms per token from per-step timestamps inside one ``generate()`` of N new tokens, (t_N - t_8) / (N - 8),
so that every page-selection step counts (first-time lengths as ``decode_ms_per_token``; stock also reports
repeated lengths, where cuDNN reuses its plans, as ``decode_ms_per_token_repeated``); peak allocated and
reserved memory; allocated memory before the call and right after it returns (no ``gc.collect()``).
Random weights give diffuse attention, the worst case for SampleAttention. Results are written after every
row to benchmarks/results/e2e.json (rows of other parts and lengths are kept) with a PNG beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, StepClock, meta, short_device  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig, decode_graph, last_call, patch_model, unpatch_model  # noqa: E402

CONFIGS = ("stock", "stock_static_compile", "patched_default", "patched_streaming50", "patched_dense",
           "patched_dense_exact", "patched_sample_pinned", "patched_eager", "patched_compile", "patched_bound_only",
           "patched_default_fp8", "patched_streaming50_fp8")
LSERVE = dict(sink_size=128, local_size=4096, decode_local_size=256, token_budget=4096, reuse_interval=4)
PATCHED = {
    "patched_default": dict(streaming_fraction=0.5),
    "patched_streaming50": dict(streaming_fraction=0.5, alpha=1.0),
    "patched_dense": dict(streaming_fraction=0.0, alpha=1.0),
    "patched_dense_exact": dict(streaming_fraction=0.0, alpha=1.0),  # token_budget: past every prompt (configure)
    "patched_sample_pinned": dict(streaming_fraction=0.5),
    "patched_eager": dict(streaming_fraction=0.5, decode_graphs=False),
    "patched_compile": dict(streaming_fraction=0.5, decode_compile=True),
    "patched_bound_only": dict(streaming_fraction=0.5, shortlist=1),
    "patched_default_fp8": dict(streaming_fraction=0.5, kv_dtype="fp8"),
    "patched_streaming50_fp8": dict(streaming_fraction=0.5, alpha=1.0, kv_dtype="fp8"),
}
DENSITIES = RESULTS / "sample_density.json"
FAMILY_NAMES = {"llama3-8b": "Llama-3-8B", "qwen3-8b": "Qwen3-8B", "gemma3-12b": "Gemma-3-12B (text)",
                "gpt-oss-20b": "GPT-OSS-20B"}
GIB = 2**30


class Device:
    """The timing and memory functions of the device under test (None for memory on the CPU)."""

    def __init__(self, name: str):
        self.cuda = name == "cuda"
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def clean(self):
        """Between rows: collect, give cached blocks back, reset the peaks."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def reset_peaks(self):
        """Between calls of one row: the caching allocator keeps its blocks, as in a user's loop."""
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def allocated(self):
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def peaks(self):
        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def one_call(model, device: Device, ids, mask, new_tokens: int, extra: dict) -> dict:
    """One ``generate()``: per-token timestamps and memory around it."""
    device.reset_peaks()
    before = device.allocated()
    clock = StepClock(device.sync)
    device.sync()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([clock]), **extra)
    device.sync()
    after = device.allocated()  # right after return, no gc.collect(): a reference cycle would show here
    peak, reserved = device.peaks()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    del out
    t = clock.times
    result = {"ttft_s": t[0] - start, "before_gib": before, "after_return_gib": after, "peak_gib": peak,
              "reserved_gib": reserved}
    if new_tokens > 8:
        per_token = (t[new_tokens - 1] - t[7]) / (new_tokens - 8)
        result["decode_ms_per_token"] = 1000 * per_token
        result["warmup_excess_s"] = max(0.0, (t[7] - t[0]) - 7 * per_token)  # compile / capture in steps 2..8
    return result


def inputs(batch: int, length: int, vocab: int, device: str):
    """Random prompt tokens; rows of a batch are left-padded by b * length / (4 * batch) pads."""
    gen = torch.Generator().manual_seed(length + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pads = b * length // (4 * batch)
        ids[b, :pads], mask[b, :pads] = 0, 0
    return ids.to(device), mask.to(device)


SETTING_FIELDS = ("streaming_fraction", "sink_size", "local_size", "decode_local_size", "token_budget",
                  "reuse_interval", "alpha", "dense_below", "rw", "r_row", "page_size", "logical_page_size",
                  "decode_graphs", "decode_compile", "shortlist", "kv_dtype")


def pinned_densities(num_layers: int, path: Path = DENSITIES) -> list[float]:
    """The densities SampleAttention chose on real weights at the longest length the model was trained for (rows
    past it, measured with positions extended by RoPE scaling, are extrapolation and not used; the profile's
    default r_row first where both were measured), one per layer of this model (layers mapped by depth)."""
    rows = [r for r in json.loads(path.read_text())["rows"] if not r.get("extrapolated")]
    measured = max(rows, key=lambda r: (r["L"], r.get("r_row", 0.05) == Profile.r_row))["density"]
    return [measured[round(i * (len(measured) - 1) / max(num_layers - 1, 1))] for i in range(num_layers)]


def pin_stripes(densities: list[float] | None) -> None:
    """Replace (or, with None, restore) SampleAttention's stripe choice by one that keeps the stripes stage 1
    ranks first until the layer's mask reaches ``densities[layer]`` of the causal matrix (one-shot prefill:
    layers are called in order, so a counter names the layer)."""
    from sparse_attn_hf.methods import sample_attention as sa

    if densities is None:
        sa.choose_stripes = getattr(sa, "_measured_choose_stripes", sa.choose_stripes)
        return
    sa._measured_choose_stripes = getattr(sa, "_measured_choose_stripes", sa.choose_stripes)
    calls = iter(range(10**12))

    def choose(col, row_mass, alpha):
        layer = next(calls) % len(densities)
        k_len = col.shape[-1]
        window = sa.window_size(PINNED_RW, k_len)
        target = densities[layer] * k_len * (k_len + 1) / 2 - (window * k_len - window * (window - 1) / 2)
        order = torch.sort(col, dim=-1, descending=True, stable=True).indices
        seen = (k_len - order - window).clamp(min=0).double().cumsum(-1)  # rows seeing each kept stripe
        counts = ((seen < target).sum(-1) + 1).clamp(max=k_len).to(torch.int32)
        if target <= 0:  # the window alone reaches the density
            counts = torch.zeros_like(counts)
        return sa._top_columns(col, counts), counts

    sa.choose_stripes = choose


PINNED_RW = 0.08  # the package's default rw, which the pinned configuration keeps


def configure(model, config: str, settings: dict, scores: torch.Tensor) -> tuple[dict, dict | None]:
    """Patch (or leave stock) for ``config``; returns the extra generate() arguments and the resolved
    settings of a patched model."""
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    pin_stripes(pinned_densities(model.config.num_hidden_layers) if config == "patched_sample_pinned" else None)
    resolved = None
    if config in PATCHED:
        settings = dict(settings)
        if config == "patched_dense_exact":  # every prompt of the run fits the budget: exact decoding
            page = settings.get("page_size", 64)
            settings["token_budget"] = page * -(-model.config.max_position_embeddings // page)
        patch_model(model, Profile.from_scores(model, scores), SparseConfig(**settings, **PATCHED[config]))
        resolved = {k: getattr(model._sparse_attn_state.settings, k) for k in SETTING_FIELDS}
    return ({"cache_implementation": "static"} if config == "stock_static_compile" else {}), resolved


def run_row(model, device: Device, config: str, length: int, batch: int, args, extra: dict) -> dict:
    ids, mask = inputs(batch, length, model.config.vocab_size, "cuda" if device.cuda else "cpu")
    if getattr(args, "structured", False):
        from benchmarks.common.llama8b import place_sinks

        ids = place_sinks(ids, mask)
    call_args = dict(extra, **({"prefill_chunk_size": args.chunk} if args.part == "long" else {}))
    row = {"config": config, "L": length, "batch": batch, "part": args.part, "status": "ok",
           "args": {"max_new_tokens": args.new_tokens, "do_sample": False, "eos_token_id": None,
                    "attention_mask": "left padding" if batch > 1 else "ones", **call_args}}
    device.clean()
    decode_graph.last_capture.clear()
    try:
        cold = one_call(model, device, ids, mask, args.new_tokens, call_args)
        capture = dict(decode_graph.last_capture)  # the cold call's capture (each generate() captures anew)
        if getattr(model, "_sparse_attn_state", None) is not None:  # how its decode steps ran, and why
            row["last_call"] = last_call(model).as_dict()
        calls = [cold]
        warm = [one_call(model, device, ids, mask, 1, call_args) for _ in range(args.repeats)]
        calls += warm
        row.update(ttft_cold_s=cold["ttft_s"], decode_ms_per_token=cold.get("decode_ms_per_token"),
                   ttft_s=statistics.median(c["ttft_s"] for c in warm) if warm else cold["ttft_s"],
                   ttft_calls=len(warm) or 1)
        if config == "stock" and args.repeats:  # cuDNN plans per key length: the same lengths again
            again = one_call(model, device, ids, mask, args.new_tokens, call_args)
            calls.append(again)
            row["decode_ms_per_token_repeated"] = again.get("decode_ms_per_token")
        if config in ("stock_static_compile", "patched_compile"):
            row["compile_s"] = cold.get("warmup_excess_s")
        if capture:
            row.update(compile_s=capture["seconds"], graph_gib=capture["graph_bytes"] / GIB)
        if row["decode_ms_per_token"]:
            row["tokens_per_s"] = 1000 * batch / row["decode_ms_per_token"]
        choices = getattr(getattr(model, "_sparse_attn_state", None), "sample_choices", None)
        if choices:  # SampleAttention's last choices (the warm calls' prefill)
            row["sample"] = {"density_mean": statistics.mean(c["density"] for c in choices.values()),
                             "predicted_cost_mean": statistics.mean(c["predicted_cost"] for c in choices.values()),
                             "sparse_layers": sum(c["sparse"] for c in choices.values()), "layers": len(choices)}
            choices.clear()
        if device.cuda:
            row.update(before_gib=cold["before_gib"], peak_gib=max(c["peak_gib"] for c in calls),
                       reserved_gib=max(c["reserved_gib"] for c in calls),
                       after_return_gib=max(c["after_return_gib"] for c in calls))
            row["returned_within_64mib"] = all(c["after_return_gib"] - c["before_gib"] <= 64 / 1024 for c in calls)
    except torch.OutOfMemoryError as error:
        row.update(status="oom", error=str(error).splitlines()[0][:200])
        if device.cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    finally:
        device.clean()
    return row


def predicted_stock_row(model, config: str, length: int, batch: int, args, total_gib: float | None) -> dict:
    """Stock at long lengths is not run: the KV bytes (and the time) say why."""
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    kv = kv_per_token * length * batch / GIB
    fits = total_gib is None or weights + kv < total_gib
    return {"config": config, "L": length, "batch": batch, "part": args.part,
            "status": "not_run" if fits else "oom_predicted", "kv_bytes_per_token": kv_per_token, "kv_gib": kv,
            "weights_gib": weights, "device_gib": total_gib,
            "reason": (f"weights {weights:.1f} GiB + KV {kv:.1f} GiB ({kv_per_token // 1024} KiB per token) "
                       + (f"fit in {total_gib or 0:.0f} GiB: not run for time (a one-shot prefill at this length "
                          "takes minutes)" if fits else f"exceed the {total_gib:.0f} GiB of the device"))}


def _key(row: dict) -> tuple:
    return row.get("family", "llama3-8b"), row.get("device"), row["part"], row["config"], row["L"], row["batch"]


def write(path: Path, info: dict, rows: list[dict]) -> None:
    """Merge ``rows`` of the run ``info`` into ``path``: rows of the same (device, part, config, L, batch) are
    replaced, others kept; every row names its run (``meta.runs``: commit, date, command, device of each run) and
    its device, so one file can hold an H200's rows beside an H100's without relabelling either."""
    old = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    runs = dict(old["meta"].get("runs", {}))
    for r in old["rows"]:  # files written before rows named their device
        r.setdefault("device", runs.get(r.get("run"), old["meta"]).get("device"))
    run_id = f"{info['date']} {info['commit'][:10]}"
    runs[run_id] = {k: v for k, v in info.items() if k != "runs"}
    rows = [dict(r, run=run_id, device=info.get("device")) for r in rows]
    new_keys = {_key(r) for r in rows}
    merged = [r for r in old["rows"] if _key(r) not in new_keys] + rows
    merged.sort(key=lambda r: (r.get("family", ""), r["part"] != "core", r["batch"], r["L"],
                               CONFIGS.index(r["config"])))
    runs = {k: v for k, v in runs.items() if any(r.get("run") == k for r in merged)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**info, "runs": runs}, "rows": merged}, indent=1) + "\n")
    plot(path, merged, info)


def merge(paths: list[Path], out: Path) -> None:
    """Parts run on separate GPU leases, each written to its own file, merged in order (a later row replaces an
    earlier one of the same part, configuration, length and batch)."""
    for path in paths:
        data = json.loads(path.read_text())
        for run_id, info in data["meta"].get("runs", {}).items():
            write(out, info, [r for r in data["rows"] if r.get("run", run_id) == run_id])


STYLE = {"stock": ("tab:blue", "o", "-"), "stock_static_compile": ("tab:cyan", "v", "--"),
         "patched_default": ("tab:green", "s", "-"), "patched_streaming50": ("tab:olive", "D", "--"),
         "patched_dense": ("tab:purple", "P", ":"), "patched_dense_exact": ("tab:red", "^", ":"),
         "patched_sample_pinned": ("tab:orange", "X", "-."), "patched_eager": ("tab:brown", "<", "-."),
         "patched_compile": ("tab:pink", ">", "-."), "patched_bound_only": ("tab:gray", "*", "-."),
         "patched_default_fp8": ("darkgreen", "h", ":"), "patched_streaming50_fp8": ("darkolivegreen", "H", ":")}


def plot(path: Path, rows: list[dict], info: dict) -> None:
    """TTFT, decode ms per token and peak memory against prompt length (batch 1, log-log), one line per
    configuration; the decode floor (stock compiled at 1K) as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    floor = next((r for r in rows if r["config"] == "stock_static_compile" and r["L"] == 1024 and r["status"] == "ok"
                  and r.get("decode_ms_per_token")), None)
    families = list(dict.fromkeys(r.get("family", "") for r in rows))
    devices = list(dict.fromkeys(r.get("device") or info["device"] for r in rows))
    shades = ("-", "--", ":", "-.")
    for family, device, config in [(f, d, c) for f in families for d in devices for c in CONFIGS]:
        points = sorted(((r["L"], r) for r in rows if r["config"] == config and r.get("family", "") == family
                         and (r.get("device") or info["device"]) == device
                         and r["batch"] == 1 and r["status"] == "ok" and r["L"] > 1024), key=lambda p: p[0])
        if not points:
            continue
        color, marker, line = STYLE.get(config, (None, "o", "-"))
        if len(families) > 1:  # one model per line style, one configuration per colour
            line, marker = shades[families.index(family) % len(shades)], "os^D"[families.index(family) % 4]
        label = f"{family}: {config}" if len(families) > 1 else config
        if len(devices) > 1:  # a second card's rows are their own line, named by the card
            label += f" ({short_device(device)})"
            if devices.index(device):
                marker = "*"
        style = dict(marker=marker, linestyle=line, color=color, label=label, markersize=7, alpha=0.9)
        lengths = [p[0] for p in points]
        axes[0].plot(lengths, [p[1]["ttft_s"] for p in points], **style)
        decode = [(p[0], p[1].get("decode_ms_per_token")) for p in points if p[1].get("decode_ms_per_token")]
        if decode:
            axes[1].plot(*zip(*decode), **style)
        memory = [(p[0], p[1].get("peak_gib")) for p in points if p[1].get("peak_gib")]
        if memory:
            axes[2].plot(*zip(*memory), **style)
    if floor is not None:
        axes[1].axhline(floor["decode_ms_per_token"], color="gray", linestyle="--", linewidth=1,
                        label="floor: stock compiled at 1K")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lengths = sorted({r["L"] for r in rows if r["batch"] == 1 and r["status"] == "ok" and r["L"] > 1024})
    for ax, title in zip(axes, ("time to first token, s", "decode, ms per token", "peak memory, GiB")):
        ax.set_xscale("log", base=2)
        if "memory" not in title:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 2**20:g}M" if x >= 2**20 else f"{x / 1024:g}K"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("prompt tokens (batch 1)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    model = f"the {info['model'].split(' shape')[0]} shape" if len(families) == 1 else "full-size model shapes"
    fig.suptitle(f"generate() on {model} (random weights), stock against patched, "
                 f"{', '.join(short_device(d) for d in devices)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def build_model(args, max_len: int):
    if args.dry_run and args.family != "llama3-8b":
        from benchmarks.common.llama8b import tiny_family

        return tiny_family(args.family, max_len)
    if args.dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_len)
        if args.structured:
            from benchmarks.common.llama8b import plant_columns

            config.attention_bias = True
            return plant_columns(LlamaForCausalLM(config).eval())
        return LlamaForCausalLM(config).eval()
    from benchmarks.common.llama8b import build, build_family

    if args.family != "llama3-8b":
        return build_family(args.family, max_len, args.layers)
    return build(args.layers or 32, max_len, structured=args.structured)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("core", "long"), default="core")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=None)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                        help="batch sizes (with left padding) run at --batch-length")
    parser.add_argument("--batch-length", type=int, default=32768)
    parser.add_argument("--configs", type=lambda s: s.split(","), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="warm TTFT calls per row (median)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32768, help="prefill_chunk_size of the long part")
    parser.add_argument("--layers", type=int, default=None, help="depth (default: the family's own; Llama 32)")
    parser.add_argument("--family", default="llama3-8b", choices=("llama3-8b", "qwen3-8b", "gemma3-12b", "gpt-oss-20b"),
                        help="the full-size shape measured (benchmarks/common/llama8b.py)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--floor", action="store_true", help="also stock_static_compile at L=1024 (decode floor)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: the bookkeeping only")
    parser.add_argument("--structured", action="store_true", help="attention with planted key columns (Llama shape)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/e2e.json, e2e_families.json, e2e_structured.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these result files into --out and stop")
    args = parser.parse_args(argv)
    if args.structured and args.family != "llama3-8b":
        raise SystemExit("--structured plants columns in the Llama-3-8B shape only")
    family = args.family != "llama3-8b" or args.structured
    tag = "llama3-8b+columns" if args.structured else args.family
    args.out = args.out or RESULTS / ("e2e_structured.json" if args.structured else
                                      "e2e_families.json" if family else "e2e.json")
    if args.merge:
        return merge(args.merge, args.out)
    if args.dry_run:
        args.layers, args.new_tokens, args.repeats = 2, 12, 2
        lengths, args.batch_length, args.chunk = args.lengths or [96, 160], 96, 64
        batches = args.batches if args.batches is not None else ([] if args.part == "long" else [2])
        settings = dict(sink_size=4, local_size=32, decode_local_size=8, token_budget=128, reuse_interval=4)
        if args.structured:  # tiny prompts: let SampleAttention sample them (on a GPU the prompts pass 16K)
            settings["dense_below"] = 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e.py measures a GPU; use --dry-run on a CPU.")
        long = args.part == "long"
        lengths = args.lengths if args.lengths is not None else ([524288, 1048576] if long else [8192, 32768, 131072])
        batches = args.batches if args.batches is not None else ([] if long else [4, 8])
        settings = LSERVE
    configs = args.configs or (["stock", "patched_streaming50"] if args.part == "long" else
                               ["stock", "patched_streaming50", "patched_default"] if args.structured else
                               ["stock", "patched_default"] if family else list(CONFIGS))
    device = Device("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    max_len = max(lengths + [args.batch_length]) + args.new_tokens + 64
    model = build_model(args, max_len)
    scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                        generator=torch.Generator().manual_seed(0))
    info = meta(device=device.name, dtype=str(model.dtype).replace("torch.", ""), extra={
        "part": args.part, "layers": model.config.num_hidden_layers,
        "model": f"{FAMILY_NAMES[args.family]} shape (benchmarks/common/llama8b.py), random weights"
                 + (", planted key columns (llama8b.plant_columns)" if args.structured else ""),
        "stock_attention": model.config._attn_implementation,
        "settings": {},  # the resolved SparseConfig of each patched configuration, below
        "patched_overrides": PATCHED, "new_tokens": args.new_tokens, "ttft_repeats": args.repeats,
        "decode_formula": "(t_N - t_8) / (N - 8), t_k: k-th token out (synchronized)",
        "gpu_gib": torch.cuda.get_device_properties(0).total_memory / GIB if device.cuda else None})
    plan = [(c, length, 1) for length in lengths for c in configs]
    plan += [(c, args.batch_length, b) for b in batches for c in configs]
    if args.floor:
        plan.insert(0, ("stock_static_compile", 1024, 1))
    rows = []
    order = sorted(dict.fromkeys(c for c, _, _ in plan), key=lambda c: c == "stock_static_compile")  # its compiles last
    for config in order:
        if config == "patched_sample_pinned" and not DENSITIES.exists():
            for _, length, batch in (p for p in plan if p[0] == config):
                rows.append({"config": config, "L": length, "batch": batch, "part": args.part, "status": "not_run",
                             "reason": f"{DENSITIES.name} is missing: run benchmarks/fidelity/sample_density.py first"})
            continue
        device.sync()
        patching = time.perf_counter()
        extra, resolved = configure(model, config, settings, scores)  # patch_model warms a CUDA model up (compiles)
        device.sync()
        patch_s = time.perf_counter() - patching
        if resolved is not None:
            info["settings"][config] = resolved
        if not (args.part == "long" and config == "stock"):
            ids, mask = inputs(1, 64 if args.dry_run else 1024, model.config.vocab_size, "cuda" if device.cuda else "cpu")
            one_call(model, device, ids, mask, 16, dict(extra, **({"prefill_chunk_size": 512} if args.part == "long" else {})))
        for _, length, batch in (p for p in plan if p[0] == config):
            if args.part == "long" and config == "stock":
                row = predicted_stock_row(model, config, length, batch, args, info["gpu_gib"])
            elif args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                row = {"config": config, "L": length, "batch": batch, "part": args.part, "status": "not_run",
                       "reason": f"time budget of the run ({args.budget_s:.0f} s) spent"}
            else:
                pending = {"config": config, "L": length, "batch": batch, "part": args.part, "status": "running",
                           "reason": "started and never finished: the process was stopped (time limit or crash)"}
                if family:
                    pending["family"] = tag
                write(args.out, info, rows + [pending])  # stays in the file if the process is killed
                row = run_row(model, device, config, length, batch, args, extra)
                if resolved is not None:
                    row["settings"] = resolved
                    row["patch_s"] = patch_s  # the configuration's patch_model, its warm-up included
            if family:
                row["family"] = tag
            rows.append(row)
            write(args.out, info, rows)
            printable = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "args"}
            print(json.dumps(printable), flush=True)
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
