"""Beyond one device, on the CPU: Transformers tensor parallelism (two gloo processes) and per-layer devices.

The tensor-parallel test starts ``torchrun --nproc_per_node 2`` on this file (``--worker``): each rank loads
a tiny random Llama with ``from_pretrained(..., tp_plan="auto")`` (q/k/v projections sharded by head, one
KV head per rank), patches it with a profile whose two KV heads have different labels in each layer, and
saves what it computed; the test compares that with the same model patched in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# layer 0: KV head 1 streams; layer 1: KV head 0 streams (fraction 0.5 of 4 pairs): each rank holds one
# dense and one streaming (layer, head) pair, in opposite layers, so a rank given the other's labels differs
SCORES = [[0.9, 0.1], [0.2, 0.8]]
SETTINGS = dict(streaming_fraction=0.5, sink_size=2, local_size=8, decode_local_size=4, page_size=16,
                logical_page_size=4, token_budget=32, reuse_interval=2)
PROMPT, NEW_TOKENS = 48, 12  # the decode context passes the 32-token budget: page selection acts


def _config(kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32 * kv_heads, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads, head_dim=16,
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _save_model(path: Path, kv_heads: int = 2) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(kv_heads)).eval()
    with torch.no_grad():  # larger than the default init: attention far from uniform, labels matter
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)


def _inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (1, PROMPT), generator=generator)
    batch = torch.randint(3, 128, (2, PROMPT), generator=generator)
    batch[1, :5] = 0  # row 1 left-padded by 5
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    return ids, batch, mask


def _run_patched(model) -> dict:
    """What both sides compute with a patched model: logits of a forward, greedy decoding through the
    SparseCache (per-step logits), a left-padded batch."""
    ids, batch, mask = _inputs()
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    return {"logits": logits, "tokens": out.sequences, "step_logits": torch.stack(out.logits, dim=1),
            "padded_tokens": padded}


def _worker(folder: Path) -> None:
    """One rank of ``torchrun --nproc_per_node 2 tests/test_parallel.py --worker FOLDER``."""
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    from sparse_attn_hf import Profile, patch_model, unpatch_model

    result = {}
    model = AutoModelForCausalLM.from_pretrained(folder / "model", tp_plan="auto", dtype=torch.float32).eval()
    rank = dist.get_rank()
    result["k_proj_local_rows"] = model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]
    patch_model(model, folder / "profile.safetensors")
    state = model._sparse_attn_state
    result["slice"] = (state.heads.start, state.heads.stop, state.heads.rank, state.heads.world_size)
    result["streaming"] = state.streaming.clone()
    result.update(_run_patched(model))
    unpatch_model(model)

    # a profile made on the sharded model itself (its weight fingerprint is computed from DTensors)
    profile = Profile.from_scores(model, torch.tensor(SCORES), **SETTINGS)
    patch_model(model, profile)
    result["from_scores_tokens"] = _run_patched(model)["tokens"]
    unpatch_model(model)

    # 3 KV heads over 2 ranks: refused before anything runs
    odd = AutoModelForCausalLM.from_pretrained(folder / "model_kv3", tp_plan="auto", dtype=torch.float32).eval()
    try:
        patch_model(odd, Profile.all_dense(odd))
        result["odd_error"] = None
    except ValueError as error:
        result["odd_error"] = str(error)

    # sharded by hand with torch's own tensor parallelism: Transformers does not know, the plugin must not guess
    hand = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in hand.model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                   "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
    patch_model(hand, folder / "profile.safetensors")
    try:
        with torch.no_grad():
            hand(_inputs()[0])
        result["hand_error"] = None
    except ValueError as error:
        result["hand_error"] = str(error)

    torch.save(result, folder / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _rank_logs(logs: Path) -> str:
    """The end of every rank's own log (torchrun --redirects): a crashing rank's message, not its peer's."""
    parts = []
    for path in sorted(logs.rglob("*.log")):
        text = path.read_text(errors="replace")
        parts.append(f"--- {path.relative_to(logs)} ---\n{text[-4000:]}")
    return "\n".join(parts) or f"no rank logs under {logs}"


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """(single-process results, [rank 0, rank 1] results, folder)."""
    from transformers import AutoModelForCausalLM

    from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model

    folder = tmp_path_factory.mktemp("tp")
    _save_model(folder / "model")
    _save_model(folder / "model_kv3", kv_heads=3)
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    Profile.from_scores(model, torch.tensor(SCORES), **SETTINGS).save(folder / "profile.safetensors")

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    logs = folder / "logs"  # each rank's stdout and stderr in its own file: a failure shows the rank that failed
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3",
               str(Path(__file__).resolve()), "--worker", str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode and "Signal 6 (SIGABRT)" in done.stderr:
        # once on CI (2 cores, the whole suite) rank 1 aborted inside gloo and the log kept only rank 0's side; it
        # never reproduced here in 8 runs, alone or under load. Such a crash gets one more run, and its logs are
        # shown as a warning; a failure of the package's own code fails both runs.
        warnings.warn("tensor-parallel run aborted once, run again:\n" + _rank_logs(logs)[-6000:])
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, _rank_logs(logs) + "\n--- torchrun ---\n" + done.stderr[-3000:]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]

    patch_model(model, folder / "profile.safetensors")
    single = _run_patched(model)
    single["streaming"] = model._sparse_attn_state.streaming.clone()
    unpatch_model(model)
    with torch.no_grad():
        single["dense_logits"] = model(_inputs()[0]).logits
    swapped = Profile.from_scores(model, torch.tensor(SCORES).flip(1), **SETTINGS)  # the heads' labels exchanged
    patch_model(model, swapped, SparseConfig())
    with torch.no_grad():
        single["swapped_logits"] = model(_inputs()[0]).logits
    unpatch_model(model)
    return single, ranks, folder


def test_each_rank_holds_its_slice_of_the_labels(tp_run):
    single, ranks, _ = tp_run
    assert single["streaming"].tolist() == [[False, True], [True, False]]
    for rank, result in enumerate(ranks):
        assert result["k_proj_local_rows"] == 16  # one KV head of head_dim 16: really sharded by head
        assert result["slice"] == (rank, rank + 1, rank, 2)
        assert torch.equal(result["streaming"], single["streaming"][:, rank : rank + 1])


def test_tensor_parallel_matches_one_process(tp_run):
    single, ranks, _ = tp_run
    # the test can see a slicing error: labels of the other head change the logits far beyond the tolerance
    assert (single["swapped_logits"] - single["logits"]).abs().max() > 1e-2
    assert (single["dense_logits"] - single["logits"]).abs().max() > 1e-2
    for result in ranks:
        torch.testing.assert_close(result["logits"], single["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["step_logits"], single["step_logits"], rtol=1e-5, atol=1e-5)
        assert torch.equal(result["tokens"], single["tokens"])
        assert torch.equal(result["padded_tokens"], single["padded_tokens"])
        assert torch.equal(result["from_scores_tokens"], single["tokens"])


def test_tensor_parallel_refuses_what_it_cannot_slice(tp_run):
    _, ranks, _ = tp_run
    for result in ranks:
        assert "3 KV heads" in result["odd_error"] and "over 2 ranks" in result["odd_error"]
        error = result["hand_error"]
        assert error is not None and "received 2 query and 1 KV heads" in error and "expected 4 and 2" in error



def test_multi_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/e2e/multi_gpu.py's CPU path: both modes (tp through torchrun and gloo) and device_map with FP8 pages
    merge into one JSON, each its own row."""
    import json

    script = str(REPO / "benchmarks" / "e2e" / "multi_gpu.py")
    common = ["--dry-run", "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "multi_gpu")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for command in ([sys.executable, script, "--mode", "device_map"],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                     "--mode", "tp"],
                    [sys.executable, script, "--mode", "device_map", "--kv-dtype", "fp8"]):
        done = subprocess.run(command + common, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert set(results["meta"]["runs"]) == {"device_map float32", "tp float32", "device_map float32 fp8"}
    rows = {row["mode"] + (" fp8" if row["kv_dtype"] == "fp8" else ""): row for row in results["rows"]}
    assert rows["device_map fp8"]["patched_heads_per_process"] == [0, 2]
    assert rows["tp"]["patched_heads_per_process"] == [0, 1]  # rank 0's slice
    assert rows["device_map"]["patched_heads_per_process"] == [0, 2]
    for row in rows.values():
        assert "error" not in row
        assert row["patched_max_logit_diff"] < 1e-4 and row["patched_within_tolerance"]
        assert row["patched_short_tokens_identical"] and row["patched_long_tokens_identical"]
        assert row["patched_decode_tokens_per_s_two_gpus"] > 0

# ------------------------------------------------------------------- without processes: the rules
class _Mesh:
    def __init__(self, rank, size, names=("pp", "fsdp", "tp")):
        self.rank, self._size, self.mesh_dim_names = rank, size, names
        self.ndim = len(names)

    def __getitem__(self, name):
        return _Mesh(self.rank, self._size, (name,))

    def size(self):
        return self._size

    def get_local_rank(self):
        return self.rank


def _tp_model(rank, size, plan_style="colwise"):
    return SimpleNamespace(_tp_size=size, _device_mesh=_Mesh(rank, size),
                           _tp_plan={"model.layers.*.self_attn.k_proj": plan_style})


def test_kv_head_slice_rules():
    from sparse_attn_hf.parallel import kv_head_slice

    plain = kv_head_slice(SimpleNamespace(_tp_size=None), 8)
    assert (plain.start, plain.stop, plain.sharded) == (0, 8, False)
    heads = kv_head_slice(_tp_model(rank=3, size=4), 8)
    assert (heads.start, heads.stop, heads.rank, heads.world_size, heads.sharded) == (6, 8, 3, 4, True)
    gathered = kv_head_slice(_tp_model(rank=1, size=2, plan_style="colwise_rep"), 8)  # k_proj output gathered
    assert (gathered.start, gathered.stop) == (0, 8)
    with pytest.raises(ValueError, match="8 KV heads, which tensor parallelism over 3 ranks cannot split"):
        kv_head_slice(_tp_model(rank=0, size=3), 8)
    with pytest.raises(ValueError, match="no 'tp' dimension"):
        kv_head_slice(SimpleNamespace(_tp_size=2, _device_mesh=_Mesh(0, 2, ("dp", "fsdp"))), 8)


def test_run_time_head_check():
    from sparse_attn_hf.parallel import KVHeadSlice, check_heads

    module = SimpleNamespace(num_key_value_groups=4, layer_idx=5)
    heads = KVHeadSlice(2, 4, 8, rank=1, world_size=4)
    check_heads(heads, module, query_heads=8, kv_heads=2)
    with pytest.raises(ValueError, match="layer 5 received 8 query and 4 KV heads.*rank 1 of 4 holds KV heads"):
        check_heads(heads, module, query_heads=8, kv_heads=4)
    with pytest.raises(ValueError, match="received 4 query and 2 KV heads"):  # query heads not of this slice
        check_heads(heads, module, query_heads=4, kv_heads=2)


@pytest.mark.filterwarnings("ignore:.*kv_dtype='fp8' on a CPU")
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_cache_layers_allocate_on_their_own_device(monkeypatch, kv_dtype):
    """device_map puts layers on several devices: each SparseCache layer allocates where its keys arrive
    (here layer 0 on the CPU, layer 1 on the meta device, the one second device a CPU machine has), FP8 pages'
    scales and ring of recent tokens included."""
    from helpers import tiny_model

    from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model

    model = tiny_model(heads=4, kv_heads=2, layers=2)
    patch_model(model, Profile.from_scores(model, torch.tensor(SCORES), **SETTINGS), SparseConfig(kv_dtype=kv_dtype))
    cache = SparseCache(model, max_cache_len=40)
    for layer, device in zip(cache.layers, ("cpu", "meta")):
        key = torch.randn(1, 2, 5, 16, device=device)
        layer.update(key, key)
        layer._ensure_capacity(5)
        assert layer.device == torch.device(device)
        assert {t.device for t in layer._tensors.values()} == {torch.device(device)}
        if kv_dtype == "fp8":
            assert {"key_scale", "value_scale", "recent_key", "recent_value"} <= layer._tensors.keys()
        assert layer.dense_idx.device == layer.stream_idx.device == torch.device(device)
    # the padding starts of a cache-less forward are kept per device, not handed to a layer elsewhere
    # (left_padding_starts itself cannot run on meta tensors: a stand-in that only places its result)
    import sparse_attn_hf.state

    monkeypatch.setattr(sparse_attn_hf.state, "left_padding_starts",
                        lambda mask, batch, length, device: torch.zeros(batch, dtype=torch.long, device=device))
    state = model._sparse_attn_state
    mask = torch.ones(1, 5, dtype=torch.long)
    assert state.kv_start_for(mask, 1, 5, torch.device("cpu")).device == torch.device("cpu")
    assert state.kv_start_for(mask, 1, 5, torch.device("meta")).device == torch.device("meta")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
