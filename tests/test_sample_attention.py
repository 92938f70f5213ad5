"""SampleAttention: both stages and the stripe kernel against their references, the kept-mass guarantee,
and the plugin path on tiny models."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, masked_sdpa, random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig, ops, patch_model, patched
from sparse_attn_hf.kernels.prefill import sparse_attention_triton
from sparse_attn_hf.kernels.reference import sampled_column_scores_reference, stripe_attention_reference
from sparse_attn_hf.kernels.sampling import sampled_column_scores_triton
from sparse_attn_hf.methods.sample_attention import (
    _row_kept_mass,
    choose_stripes,
    sample_attention_mask,
    sample_rows,
)
from sparse_attn_hf.stripe_mask import StripeMask

# batch, q heads, kv heads, q_len, k_len, head_dim, pads
CASES = [
    (1, 4, 4, 90, 90, 32, [0]),  # GQA 1
    (2, 6, 2, 70, 101, 64, [0, 9]),  # GQA 3, a chunk against a cache, padding
    (1, 8, 2, 120, 120, 16, [5]),  # GQA 4
    (1, 16, 1, 40, 40, 32, [0]),  # GQA 16
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
    common = dict(rows=rows, q_first=k_len - q_len, kv_start=torch.tensor(pads, device=DEVICE), window=window,
                  scale=dim**-0.5)
    got = sampled_column_scores_triton(q, k, **common)
    expected = sampled_column_scores_reference(q, k, **common)
    golden = sampled_column_scores_reference(q.double(), k.double(), **common)
    assert_close_by_rule(got, golden, expected, slack=1e-3)


def _mask(case, q, k, alpha=0.8, rw=0.1, r_row=0.2, criterion="mean"):
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    return sample_attention_mask(q, k, q_first=k_len - q_len, kv_start=torch.tensor(pads, device=DEVICE), alpha=alpha,
                                 rw=rw, r_row=r_row, scale=dim**-0.5, criterion=criterion)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_stripe_kernel_matches_reference(case, dtype):
    batch, heads, kv_heads, q_len, k_len, dim, pads = case
    q, k, v = _structured(case, dtype, 10 + CASES.index(case))
    mask = _mask(case, q.float(), k.float())
    poisoned = torch.full((batch, q_len, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(q, k, v, q_first=k_len - q_len, k_pos=None, kv_start=mask.kv_start,
                                  streaming=torch.zeros(kv_heads, dtype=torch.bool, device=DEVICE), sink=0, local=1,
                                  scale=dim**-0.5, stripe_mask=mask, block_n=16, out=poisoned)
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    golden = stripe_attention_reference(q.double(), k.double(), v.double(), mask=mask, scale=dim**-0.5)
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
    golden = stripe_attention_reference(q.double(), k.double(), v.double(), mask=mask, scale=dim**-0.5)
    visible = torch.stack([mask.to_dense(b) for b in range(batch)])
    common = dict(q_first=k_len - q_len, k_pos=None, kv_start=mask.kv_start,
                  streaming=torch.zeros(kv_heads, dtype=torch.bool, device=DEVICE), sink=0, local=1, scale=dim**-0.5,
                  stripe_mask=mask, block_n=16)
    for share in (0.5, None):
        out = sparse_attention_triton(q, k, v, whole_block_share=share, **common)
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
    dense = ops.sparse_attention(q, k, v, q_first=k_len - q_len, k_pos=None, kv_start=full.kv_start,
                                 streaming=torch.zeros(kv_heads, dtype=torch.bool, device=DEVICE), sink=0, local=1,
                                 scale=dim**-0.5)
    torch.testing.assert_close(ops.stripe_attention(q, k, v, mask=full, scale=dim**-0.5), dense, rtol=1e-5, atol=1e-5)


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


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "glm", "internlm3"])
def test_plugin_runs_sample_attention(family):
    if family == "internlm3":
        try:
            from transformers import InternLM3Config  # noqa: F401
        except ImportError:
            pytest.skip("this transformers release has no InternLM3")
    model = tiny_model(family, heads=6, kv_heads=2).to(DEVICE)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(4))
    ids = random_ids(1, 90).to(DEVICE)
    dense = model(ids).logits
    settings = SparseConfig(streaming_fraction=0.5, sink_size=4, local_size=16, alpha=0.8, rw=0.1, r_row=0.2,
                            dense_below=0, record_masks=True)
    with patched(model, Profile.from_scores(model, scores), settings):
        sparse = model(ids).logits
        state = model._sparse_attn_state
        with_dense_heads = {layer for layer in range(2) if not state.streaming[layer].all()}
        assert with_dense_heads and set(state.masks) == with_dense_heads
        assert all(isinstance(m, StripeMask) and m.density() < 1.0 for m in state.masks.values())
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 94)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    with patched(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, sink_size=4,
                                                                          local_size=16, alpha=1.0, dense_below=0)):
        static_only = model(ids).logits
    with patched(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, sink_size=4,
                                                                          local_size=16)):
        torch.testing.assert_close(model(ids).logits, static_only)  # 90 tokens < dense_below: dense heads dense


@torch.no_grad()
def test_plugin_triton_path_equals_reference():
    model = tiny_model("llama", heads=8, kv_heads=2).to(DEVICE)
    patch_model(model, Profile.all_dense(model), SparseConfig(alpha=0.85, rw=0.1, r_row=0.2, dense_below=0))
    ids = random_ids(2, 70).to(DEVICE)
    try:
        ops.set_backend("reference")
        expected = model(ids).logits
        ops.set_backend("triton")
        got = model(ids).logits
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
