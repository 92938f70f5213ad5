"""SampleAttention: both stages and the stripe kernel against their references, the kept-mass guarantee,
and the plugin path on tiny models."""

import contextlib

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, left_padded, masked_sdpa, random_ids, tiny_model
from transformers import AttentionInterface

from sparse_attn_hf import Profile, SparseConfig, last_call, ops, patch_model, patched
from sparse_attn_hf.attention import sparse_attention_forward
from sparse_attn_hf.kernels.prefill import Launch, sparse_attention_triton
from sparse_attn_hf.kernels.reference import sampled_column_scores_reference, stripe_attention_reference
from sparse_attn_hf.kernels.sampling import sampled_column_scores_triton
from sparse_attn_hf.methods.sample_attention import (
    SampleSettings,
    _row_kept_mass,
    choose_stripes,
    sample_attention_mask,
    sample_rows,
)
from sparse_attn_hf.ops import LogitTerms, Visibility
from sparse_attn_hf.state import ATTENTION_NAME
from sparse_attn_hf.stripe_mask import StripeMask

# batch, q heads, kv heads, q_len, k_len, head_dim, pads
CASES = [
    (1, 4, 4, 90, 90, 32, [0]),  # GQA 1
    (2, 6, 2, 70, 101, 64, [0, 9]),  # GQA 3, a chunk against a cache, padding
    (1, 8, 2, 120, 120, 16, [5]),  # GQA 4
    (1, 16, 1, 40, 40, 32, [0]),  # GQA 16
    (1, 4, 2, 150, 300, 256, [3]),  # head_dim 256 (Gemma 3): tiles that fit the GPU's shared memory
]


def _structured(case, dtype, seed):
    """Random queries/keys with structure: a few key columns every query likes, plus locality."""
    batch, heads, kv_heads, q_len, k_len, dim, _ = case
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=torch.float64)
    q = torch.randn(batch, heads, q_len, dim, generator=gen, dtype=torch.float64)
    hot = torch.randint(0, k_len, (3,), generator=gen)
    k[:, :, hot] += 1.5 * q.mean(dim=(1, 2))[:, None, None]  # stripes
    v = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=torch.float64)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_column_scores_kernel_matches_reference(case, dtype):
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    q, k, _ = _structured(case, dtype, CASES.index(case))
    rows = sample_rows(q_len, 0.1, device=DEVICE)
    window = torch.full((batch, kv_heads), 11, dtype=torch.long, device=DEVICE)
    common = (Visibility(torch.tensor(pads, device=DEVICE), q_first=k_len - q_len), LogitTerms(dim**-0.5))
    got = sampled_column_scores_triton(q, k, *common, rows=rows, window=window)
    expected = sampled_column_scores_reference(q, k, *common, rows=rows, window=window)
    golden = sampled_column_scores_reference(q.double(), k.double(), *common, rows=rows, window=window)
    assert_close_by_rule(got, golden, expected, slack=1e-3)


def _mask(case, q, k, alpha=0.8, rw=0.1, r_row=0.2, criterion="mean"):
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    return sample_attention_mask(q, k, Visibility(torch.tensor(pads, device=DEVICE), q_first=k_len - q_len),
                                 LogitTerms(dim**-0.5), SampleSettings(alpha, rw, r_row, criterion))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_stripe_kernel_matches_reference(case, dtype):
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    q, k, v = _structured(case, dtype, 10 + CASES.index(case))
    mask = _mask(case, q.float(), k.float())
    poisoned = torch.full((batch, q_len, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(q, k, v, Visibility(mask.kv_start, streaming=torch.zeros(kv_heads, dtype=torch.bool,
                                                                                             device=DEVICE),
                                                      sink=0, local=1, q_first=k_len - q_len, k_pos=None),
                                  LogitTerms(dim**-0.5), stripe_mask=mask, out=poisoned, launch=Launch(block_n=16))
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    golden = stripe_attention_reference(q.double(), k.double(), v.double(), mask, LogitTerms(dim**-0.5))
    visible = torch.stack([mask.to_dense(b) for b in range(batch)])
    assert_close_by_rule(out, golden, masked_sdpa(q, k, v, visible, dim**-0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stripe_blocks_visited_whole_match_reference(dtype):
    """Block-or-gather: key blocks dense with stripes are visited whole with a column mask, the rest gathered;
    the output is the reference's, padding and a query chunk included."""
    from sparse_attn_hf.kernels.prefill import _stripe_arguments

    batch, heads, kv_heads, q_len, k_len, dim = 2, 8, 2, 100, 150, 32
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen).to(DEVICE, dtype)
               for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    # per (row, head): a block of 16 all stripes, one with 12 of 16, one with 9, and scattered single columns
    picks = [list(range(16, 32)) + list(range(48, 60)) + [3, 40, 77, 120], list(range(64, 73)) + [1, 5, 99, 130],
             list(range(0, 16)) + [33, 145], list(range(80, 96)) + list(range(112, 124)) + [20]]
    width = max(map(len, picks))
    stripes = torch.tensor([sorted(p) + [k_len] * (width - len(p)) for p in picks], dtype=torch.int32).view(2, 2, -1)
    mask = StripeMask(window=torch.tensor([[7, 12], [5, 30]]), stripes=stripes,
                      counts=torch.tensor([[len(picks[0]), len(picks[1])], [len(picks[2]), len(picks[3])]],
                                          dtype=torch.int32), q_len=q_len, k_len=k_len, kv_start=torch.tensor([0, 9]))
    mask = StripeMask(mask.window.to(DEVICE), mask.stripes.to(DEVICE), mask.counts.to(DEVICE), q_len, k_len,
                      mask.kv_start.to(DEVICE))
    args = _stripe_arguments(mask, k_len - q_len, q_len, 16, 16, 0.5)
    blocks = args[4]
    assert int((blocks < -(-k_len // 16)).sum()) == 6, "the blocks with >= 8 of 16 stripes are visited whole"
    assert not bool(((args[1][0] >= 16) & (args[1][0] < 32)).any()), "their stripes are not gathered again"
    golden = stripe_attention_reference(q.double(), k.double(), v.double(), mask, LogitTerms(dim**-0.5))
    visible = torch.stack([mask.to_dense(b) for b in range(batch)])
    common = (Visibility(mask.kv_start, streaming=torch.zeros(kv_heads, dtype=torch.bool, device=DEVICE), sink=0,
                         local=1, q_first=k_len - q_len, k_pos=None), LogitTerms(dim**-0.5))
    for share in (0.5, None):
        out = sparse_attention_triton(q, k, v, *common, stripe_mask=mask, whole_block_share=share,
                                      launch=Launch(block_n=16))
        assert_close_by_rule(out, golden, masked_sdpa(q, k, v, visible, dim**-0.5))


def _all_row_mass(case, q, k, mask):
    """Kept attention mass of every query row (exact attention, dense heads of a group summed per head)."""
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    rows = torch.arange(q_len, device=DEVICE)
    columns = torch.stack([mask.columns(b) for b in range(batch)])
    kept = _row_kept_mass(q.float(), k.float(), rows=rows, q_first=k_len - q_len, kv_start=mask.kv_start,
                          window=mask.window, columns=columns, scale=dim**-0.5)
    real = (k_len - q_len + rows)[None, :] >= mask.kv_start[:, None]
    return kept, real[:, None].expand_as(kept)


@pytest.mark.parametrize("alpha", [0.7, 0.9])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kept_mass_on_all_rows(case, alpha):
    q, k, _ = _structured(case, torch.float32, 20 + CASES.index(case))
    mask = _mask(case, q, k, alpha=alpha)
    kept, real = _all_row_mass(case, q, k, mask)
    mean, cra = float(kept[real].mean()), float(kept[real].min())
    print(f"alpha {alpha}: kept mass mean {mean:.3f}, CRA (min over rows) {cra:.3f}, density {mask.density():.3f}")
    assert mean >= alpha - 0.02
    strict = _mask(case, q, k, alpha=alpha, criterion="min")
    assert (strict.counts >= mask.counts).all()
    sampled = sample_rows(case[3], 0.2, device=DEVICE)
    kept_strict, real_strict = _all_row_mass(case, q, k, strict)
    assert float(kept_strict[:, :, sampled][real_strict[:, :, sampled]].min()) >= alpha - 1e-5


def test_alpha_one_is_dense_and_selection_is_deterministic():
    case = CASES[1]
    q, k, v = _structured(case, torch.float32, 3)
    first, again = _mask(case, q, k), _mask(case, q, k)
    assert torch.equal(first.stripes, again.stripes) and torch.equal(first.counts, again.counts)
    full = _mask(case, q, k, alpha=1.0)
    assert (full.counts == case[4]).all()
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    dense = ops.sparse_attention(q, k, v, Visibility(full.kv_start, streaming=torch.zeros(kv_heads, dtype=torch.bool,
                                                                                            device=DEVICE),
                                                     sink=0, local=1, q_first=k_len - q_len, k_pos=None),
                                 LogitTerms(dim**-0.5))
    torch.testing.assert_close(ops.stripe_attention(q, k, v, full, LogitTerms(dim**-0.5)), dense, rtol=1e-5, atol=1e-5)


def test_choose_stripes_meets_the_mean_exactly():
    col = torch.tensor([[[0.5, 0.0, 2.0, 1.0, 0.25]]])
    row_mass = torch.tensor([[4.0]])  # window keeps 4 - 3.75 = 0.25
    stripes, counts = choose_stripes(col, row_mass, alpha=0.8)  # need 3.2 - 0.25 = 2.95: columns 2 and 3
    assert counts.item() == 2 and stripes[0, 0, :2].tolist() == [2, 3]
    stripes, counts = choose_stripes(col, row_mass, alpha=0.05)  # the window alone suffices
    assert counts.item() == 0


def test_stripe_mask_object(tmp_path):
    mask = StripeMask(window=torch.tensor([[3, 5]]), stripes=torch.tensor([[[0, 4, 9], [2, 9, 9]]], dtype=torch.int32),
                      counts=torch.tensor([[2, 1]], dtype=torch.int32), q_len=6, k_len=9, kv_start=torch.tensor([1]))
    dense = mask.to_dense(0)
    assert dense.shape == (2, 6, 9)
    assert dense[0, 5, 4] and not dense[0, 5, 3] and not dense[0, 0, 0]  # stripe 4; 3 outside; slot 0 is a pad
    causal = float((torch.arange(3, 9) + 1).sum())
    unpadded = StripeMask(mask.window, mask.stripes, mask.counts, 6, 9, torch.tensor([0]))
    assert abs(unpadded.density() - float(unpadded.to_dense(0).sum()) / (2 * causal)) < 1e-12
    assert "stripes per head" in repr(mask)
    mask.save_picture(tmp_path / "mask.png", head=1)
    assert (tmp_path / "mask.png").stat().st_size > 0


def test_bad_settings():
    for bad in (dict(alpha=0.0), dict(alpha=1.5), dict(rw=1.0), dict(r_row=0.0), dict(cra_criterion="max"),
                dict(dense_below=-1)):
        with pytest.raises(ValueError):
            SparseConfig(**bad)


SINK_TOKENS = (3, 4, 5)


def _sink_model(family: str, *, heads: int, kv_heads: int):
    """A tiny random model whose attention has the structure SampleAttention is for: every query head puts almost
    all of its attention on the tokens ``SINK_TOKENS`` (a few strong key columns), wherever they stand.

    Hidden unit 0 is 1 in every token's embedding, unit 1 only in the sink tokens'. In every layer the last
    dimension of each query head reads unit 0 and that of each KV head unit 1, and their RoPE partner (dimension
    head_dim / 2 - 1 under rotate_half; GLM's partial rotary leaves the last dimension unrotated) is zeroed: a
    sink key scores about 16 above the others (the RMS norm scales the units by 7-10), times the cosine of the
    lowest RoPE frequency over the distance (> 0.99 at 384 tokens); the other scores stay near 0 (random weights).
    With sink tokens at four positions a row splits its mass among those it sees: SampleAttention's mean
    criterion at alpha 0.8 keeps the columns most rows see and leaves out a late one (a quarter of the mass of
    the rows past it, outside their window), so its output is measurably off dense attention."""
    model = tiny_model(family, heads=heads, kv_heads=kv_heads)
    dim = model.config.head_dim
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0], embed[:, 1] = 1.0, 0.0
        embed[list(SINK_TOKENS), 1] = 1.0
        for layer in model.model.layers:
            for proj, count, unit in ((layer.self_attn.q_proj, heads, 0), (layer.self_attn.k_proj, kv_heads, 1)):
                weight = proj.weight.view(count, dim, -1)
                weight[:, [dim // 2 - 1, dim - 1]] = 0.0
                weight[:, dim - 1, unit] = 1.0
                if proj.bias is not None:
                    proj.bias.view(count, dim)[:, [dim // 2 - 1, dim - 1]] = 0.0
    return model.to(DEVICE)


def _sink_ids(length: int, sinks_per_row) -> torch.Tensor:
    """Random tokens, none of them a sink token except at the given positions of each row."""
    ids = random_ids(len(sinks_per_row), length)
    ids[ids <= max(SINK_TOKENS)] = max(SINK_TOKENS) + 1
    for row, positions in enumerate(sinks_per_row):
        ids[row, positions] = torch.tensor([SINK_TOKENS[i % len(SINK_TOKENS)] for i in range(len(positions))])
    return ids


@contextlib.contextmanager
def _attention_calls():
    """Records (layer, query, key, value, scale, output) of every call of the patched model's attention."""
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = sparse_attention_forward(module, query, key, value, attention_mask, **kwargs)
        calls.append((module.layer_idx, query, key, value, kwargs.get("scaling"), out))
        return out, weights

    AttentionInterface.register(ATTENTION_NAME, recording)
    try:
        yield calls
    finally:
        AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)


def _query_heads(kv_heads: torch.Tensor, groups: int) -> torch.Tensor:
    return (kv_heads[:, None] * groups + torch.arange(groups, device=kv_heads.device)).flatten()


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "glm", "internlm3"])
def test_plugin_runs_sample_attention(family):
    """On attention with a few strong key columns SampleAttention's mask pays: every layer's dense heads run it
    sparse, their output is the recorded mask's attention, measurably off exact attention but close to it."""
    if family == "internlm3":
        try:
            from transformers import InternLM3Config  # noqa: F401
        except ImportError:
            pytest.skip("this transformers release has no InternLM3")
    model = _sink_model(family, heads=6, kv_heads=2)
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # each layer: one streaming and one dense KV head
    ids = _sink_ids(384, [[0, 57, 140, 263]]).to(DEVICE)
    dense = model(ids).logits
    settings = SparseConfig(streaming_fraction=0.5, sink_size=4, local_size=16, alpha=0.8, rw=0.1, r_row=0.2,
                            dense_below=0, record_masks=True)
    with patched(model, Profile.from_scores(model, scores), settings):
        with _attention_calls() as calls:
            sparse = model(ids).logits
        state = model._sparse_attn_state
        with_dense_heads = {layer for layer in range(2) if not state.streaming[layer].all()}
        assert with_dense_heads == {0, 1} and set(state.masks) == with_dense_heads
        assert all(isinstance(m, StripeMask) and m.density() < 0.3 for m in state.masks.values())
        ran_sparse = {layer for layer, choice in state.sample_choices.items() if choice["sparse"]}
        assert ran_sparse == with_dense_heads, f"SampleAttention fell back to dense: {state.sample_choices}"
        assert {last_call(model).prefill[layer].dense_method for layer in ran_sparse} == {"sample_attention"}
        assert sorted(call[0] for call in calls) == [0, 1]
        for layer, query, key, value, scale, out in calls:
            heads = state.head_split(layer, DEVICE)[0]
            query = query.index_select(1, _query_heads(heads, query.shape[1] // key.shape[1]))
            key, value = key.index_select(1, heads), value.index_select(1, heads)
            got = out.index_select(2, _query_heads(heads, query.shape[1] // key.shape[1]))
            # the output of the dense heads is the attention under the recorded mask ...
            mask = state.masks[layer]
            visible = torch.stack([mask.to_dense(b) for b in range(query.shape[0])])
            expected = masked_sdpa(query, key, value, visible, scale)
            error = float((got - expected).abs().max())
            assert error < 1e-4, f"layer {layer}: output is not the recorded mask's attention (max error {error:.1e})"
            # ... which drops some attention (SampleAttention off: exact causal attention) but keeps most of it
            exact = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
            error = float((got - exact).abs().max())
            relative = float((got - exact).norm() / exact.norm())
            assert error > 1e-3, f"layer {layer}: SampleAttention's output equals dense attention's ({error:.1e})"
            assert relative < 0.1, f"layer {layer}: SampleAttention's output is far from dense ({relative:.3f})"
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert {p.dense_method for p in last_call(model).prefill.values()} == {"sample_attention"}
    assert tokens.shape == (1, 388)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    with patched(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, sink_size=4,
                                                                          local_size=16, alpha=1.0, dense_below=0)):
        static_only = model(ids).logits
        assert {p.dense_method for p in last_call(model).prefill.values()} == {"dense"}
    difference = float((sparse - static_only).abs().max())
    assert difference > 1e-3, f"SampleAttention on and off gave the same logits (max difference {difference:.1e})"
    with patched(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, sink_size=4,
                                                                          local_size=16)):
        torch.testing.assert_close(model(ids).logits, static_only)  # 384 tokens < dense_below: dense heads dense


@torch.no_grad()
def test_plugin_triton_path_equals_reference():
    """The Triton path (sampling and stripe kernels under the interpreter on CPU) gives the reference path's
    logits where every layer runs SampleAttention sparse, a left-padded row included."""
    model = _sink_model("llama", heads=8, kv_heads=2)
    ids, attention_mask = left_padded(_sink_ids(256, [[0, 57, 140, 200], [0, 90, 170, 230]]), [0, 24])
    ids, attention_mask = ids.to(DEVICE), attention_mask.to(DEVICE)
    dense = model(ids, attention_mask=attention_mask).logits
    patch_model(model, Profile.all_dense(model), SparseConfig(alpha=0.8, rw=0.1, r_row=0.2, dense_below=0))
    state, logits, choices, methods = model._sparse_attn_state, {}, {}, {}
    try:
        for backend in ("reference", "triton"):
            ops.set_backend(backend)
            logits[backend] = model(ids, attention_mask=attention_mask).logits
            choices[backend] = {layer: dict(choice) for layer, choice in state.sample_choices.items()}
            methods[backend] = {layer: p.dense_method for layer, p in last_call(model).prefill.items()}
    finally:
        ops.set_backend("auto")
    for backend, chosen in choices.items():  # every layer ran the stripe kernel (or its reference) sparse
        assert sorted(chosen) == [0, 1] and all(c["sparse"] for c in chosen.values()), \
            f"{backend}: SampleAttention fell back to dense: {chosen}"
        assert methods[backend] == {0: "sample_attention", 1: "sample_attention"}, f"{backend}: {methods[backend]}"
    assert choices["triton"] == choices["reference"]  # the sampling kernel chose the reference's masks
    difference = float((logits["reference"] - dense).abs().max())
    assert difference > 1e-3, f"the stripe masks dropped no attention (max difference from dense {difference:.1e})"
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-3, atol=1e-4)


@torch.no_grad()
def test_sample_attention_stops_sampling_a_forward_whose_masks_do_not_pay():
    """Random weights: diffuse attention, every mask too dense to pay. After ``sample_stop_after`` such layers in a
    row the forward's later layers skip the sampling (exact dense, recorded with the reason); each forward counts
    anew, and 0 samples every layer."""
    model = tiny_model("llama", layers=6).to(DEVICE)
    ids = random_ids(1, 256).to(DEVICE)
    settings = dict(alpha=0.95, rw=0.1, r_row=0.2, dense_below=0)
    with patched(model, Profile.all_dense(model), SparseConfig(**settings)):
        state = model._sparse_attn_state
        for _ in range(2):  # the second forward samples its first layers again
            state.sample_choices.clear()
            stopped = model(ids).logits
            assert sorted(state.sample_choices) == [0, 1, 2], state.sample_choices
            assert not any(choice["sparse"] for choice in state.sample_choices.values())
            record = last_call(model).prefill
            assert all("stopped sampling" in record[layer].note for layer in (3, 4, 5))
            assert all(record[layer].note is None or "stopped" not in record[layer].note for layer in (0, 1, 2))
            assert {p.dense_method for p in record.values()} == {"dense"}
    with patched(model, Profile.all_dense(model), SparseConfig(**settings, sample_stop_after=0)):
        state = model._sparse_attn_state
        every = model(ids).logits
        assert sorted(state.sample_choices) == list(range(6))
        assert not any(choice["sparse"] for choice in state.sample_choices.values())
    torch.testing.assert_close(stopped, every)  # layers that did not pay ran dense either way
    with pytest.raises(ValueError, match="sample_stop_after=-1 must be >= 0"):
        SparseConfig(sample_stop_after=-1)
