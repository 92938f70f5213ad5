"""The Triton prefill kernel against the reference (CPU interpreter in CI; real sizes on a GPU)."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, loop_mask, masked_sdpa, random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig, ops, patch_model
from sparse_attn_hf.kernels.prefill import Launch, sparse_attention_triton
from sparse_attn_hf.ops import LogitTerms, Visibility

# batch, q heads, kv heads, q_len, k_len, head_dim, pads, sink, local, block_n
CASES = [
    (1, 4, 4, 37, 37, 64, [0], 4, 8, 16),  # GQA 1, length not a block multiple
    (2, 6, 2, 29, 45, 64, [0, 5], 3, 7, 16),  # GQA 3 (padded group), chunk against a cache, left padding
    (2, 8, 2, 40, 40, 128, [2, 0], 16, 9, 32),  # GQA 4, head_dim 128
    (1, 16, 1, 1, 70, 64, [0], 4, 6, 16),  # GQA 16, one query (decode-like)
    (3, 4, 2, 33, 33, 32, [0, 32, 3], 0, 5, 16),  # no sink, a row with a single real token
    (1, 2, 1, 50, 50, 80, [0], 64, 64, 16),  # head_dim 80, window and sink cover everything
]


def _inputs(case, dtype, seed):
    batch, heads, kv_heads, q_len, k_len, head_dim = case[:6]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, head_dim, generator=gen, dtype=torch.float64)
               for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions", ["consecutive", "given"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_reference(case, dtype, positions):
    batch, heads, kv_heads, q_len, k_len, head_dim, pads, sink, local, block_n = case
    seed = CASES.index(case) + 10 * (dtype == torch.bfloat16) + 100 * (positions == "given")
    q, k, v = _inputs(case, dtype, seed)
    streaming = (torch.arange(kv_heads) % 2 == 0).to(DEVICE)
    kv_start = torch.tensor(pads, device=DEVICE)
    slots = torch.arange(k_len, device=DEVICE).expand(batch, -1)
    k_pos = None
    if positions == "given":  # a shuffled cache with two empty slots, as SparseCache hands over
        order = torch.randperm(k_len, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        k, v = k[:, :, order], v[:, :, order]
        k_pos = slots[:, order].clone()
        k_pos[:, :2] = -1
    scale = head_dim**-0.5
    poisoned = torch.full((batch, q_len, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(q, k, v, Visibility(kv_start, streaming=streaming, sink=sink, local=local,
                                                      q_first=k_len - q_len, k_pos=k_pos),
                                  LogitTerms(scale), out=poisoned, launch=Launch(block_n=block_n))
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    positions_used = slots if k_pos is None else k_pos
    mask = loop_mask(slots[:, k_len - q_len :].cpu(), positions_used.cpu(), kv_start.cpu(), streaming.cpu(), sink, local)
    golden = masked_sdpa(q.double().cpu(), k.double().cpu(), v.double().cpu(), mask, scale)
    baseline = masked_sdpa(q.cpu(), k.cpu(), v.cpu(), mask, scale)
    assert_close_by_rule(out.cpu(), golden, baseline)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("key_all_heads", [True, False])
def test_mapped_heads_write_only_their_heads(backend, key_all_heads):
    """heads=: the kernel reads and writes the chosen KV groups of the full query/output in place (no
    gather); key/value hold those heads or every head. Other heads of ``out`` stay untouched."""
    batch, heads, kv_heads, q_len, k_len, head_dim, pads, sink, local = 2, 8, 4, 33, 45, 64, [0, 6], 3, 7
    q, k, v = _inputs((batch, heads, kv_heads, q_len, k_len, head_dim), torch.float16, seed=77)
    chosen = torch.tensor([3, 0], device=DEVICE)  # out of order on purpose
    kv_start = torch.tensor(pads, device=DEVICE)
    out = torch.full((batch, q_len, heads, head_dim), float("nan"), dtype=q.dtype, device=DEVICE)
    keys, values = (k, v) if key_all_heads else (k[:, chosen], v[:, chosen])
    streaming = torch.ones(2, dtype=torch.bool, device=DEVICE)
    try:
        ops.set_backend(backend)
        ops.sparse_attention(q, keys, values, Visibility(kv_start, streaming=streaming, sink=sink, local=local,
                                                         q_first=k_len - q_len, k_pos=None, heads=chosen, groups=2,
                                                         key_all_heads=key_all_heads),
                             LogitTerms(head_dim**-0.5), out=out)
    finally:
        ops.set_backend("auto")
    written = torch.zeros(heads, dtype=torch.bool)
    for h in chosen.tolist():
        written[2 * h : 2 * h + 2] = True
    assert torch.isnan(out[:, :, ~written]).all(), "heads outside heads= were written"
    slots = torch.arange(k_len).expand(batch, -1)
    picked_q = q.cpu().unflatten(1, (kv_heads, 2))[:, chosen.cpu()].flatten(1, 2)
    mask = loop_mask(slots[:, k_len - q_len :], slots, kv_start.cpu(), torch.ones(2, dtype=torch.bool), sink, local)
    kk, vv = k.cpu()[:, chosen.cpu()], v.cpu()[:, chosen.cpu()]
    golden = masked_sdpa(picked_q.double(), kk.double(), vv.double(), mask, head_dim**-0.5)
    baseline = masked_sdpa(picked_q, kk, vv, mask, head_dim**-0.5)
    got = out.cpu().unflatten(2, (kv_heads, 2))[:, :, chosen.cpu()].flatten(2, 3)
    assert_close_by_rule(got, golden, baseline)


def test_block_list_and_stripes_together_are_rejected():
    from sparse_attn_hf.block_mask import BlockSparseMask
    from sparse_attn_hf.stripe_mask import StripeMask

    q, k, v = _inputs((1, 2, 1, 32, 32, 64), torch.float16, seed=5)
    block_mask = BlockSparseMask.random(num_heads=1, q_len=32, k_len=32, density=0.5, block_q=128, block_k=16)
    stripes = StripeMask(window=torch.full((1, 1), 4), stripes=torch.zeros(1, 1, 1, dtype=torch.int32),
                         counts=torch.ones(1, 1, dtype=torch.int32), q_len=32, k_len=32,
                         kv_start=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        sparse_attention_triton(q, k, v, Visibility(torch.zeros(1, dtype=torch.long, device=DEVICE),
                                                    streaming=torch.zeros(1, dtype=torch.bool, device=DEVICE), sink=0,
                                                    local=1, q_first=0, k_pos=None),
                                LogitTerms(0.1), block_mask=block_mask, stripe_mask=stripes)


@torch.no_grad()
def test_model_through_the_kernel_matches_reference():
    model = tiny_model("llama", heads=6, kv_heads=2, layers=2).to(DEVICE)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(3))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(sink_size=3, local_size=8))
    ids = random_ids(2, 40).to(DEVICE)
    try:
        ops.set_backend("reference")
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        ops.set_backend("triton")
        got = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    finally:
        ops.set_backend("auto")
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-3, atol=1e-3)


# batch, q heads, kv heads, q_len, k_len, head_dim, pads, block_q, block_k, density
MASK_CASES = [
    (1, 4, 4, 100, 100, 64, [0], 128, 16, 0.3),  # GQA 1: one query block of 128 covers all
    (2, 8, 2, 70, 90, 64, [0, 11], 32, 16, 0.5),  # GQA 4, chunk against a cache, padding
    (1, 6, 2, 45, 45, 32, [3], 64, 32, 0.0),  # GQA 3, density 0: diagonal blocks only
    (1, 16, 1, 40, 40, 64, [0], 16, 16, 1.0),  # GQA 16, density 1: every causal block
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MASK_CASES, ids=[f"mask{i}" for i in range(len(MASK_CASES))])
def test_kernel_block_list_matches_reference(case, dtype):
    from sparse_attn_hf.block_mask import BlockSparseMask
    from sparse_attn_hf.kernels.reference import block_sparse_attention_reference

    batch, heads, kv_heads, q_len, k_len, head_dim, pads, block_q, block_k, density = case
    seed = MASK_CASES.index(case) + 10 * (dtype == torch.bfloat16)
    q, k, v = _inputs(case, dtype, seed)
    mask = BlockSparseMask.random(kv_heads, q_len, k_len, density, block_q, block_k, seed=seed, device=DEVICE)
    kv_start = torch.tensor(pads, device=DEVICE)
    scale = head_dim**-0.5
    poisoned = torch.full((batch, q_len, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(q, k, v, Visibility(kv_start, streaming=torch.zeros(kv_heads, dtype=torch.bool,
                                                                                        device=DEVICE),
                                                      sink=0, local=1, q_first=k_len - q_len, k_pos=None),
                                  LogitTerms(scale), out=poisoned, block_mask=mask,
                                  launch=Launch(block_m=min(128, block_q * 4)))
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    golden = block_sparse_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                              mask=mask.to("cpu"), kv_start=kv_start.cpu(), scale=scale)
    visible = mask.to_dense().cpu()[None] & (torch.arange(k_len)[None, :] >= kv_start.cpu()[:, None])[:, None, None]
    baseline = masked_sdpa(q.cpu(), k.cpu(), v.cpu(), visible, scale)
    assert_close_by_rule(out.cpu(), golden, baseline)


def test_block_mask_object():
    from sparse_attn_hf.block_mask import BlockSparseMask

    mask = BlockSparseMask.random(3, 300, 500, 0.3, block_q=64, block_k=32, seed=1)
    dense = mask.to_dense()
    causal_elements = float((torch.arange(300) + 200 + 1).sum()) * 3
    assert abs(mask.density() - float(dense.sum()) / causal_elements) < 1e-12
    again = BlockSparseMask.from_block_bool(mask.to_block_bool(), 64, 32, 300, 500)
    assert torch.equal(again.indices, mask.indices) and torch.equal(again.offsets, mask.offsets)
    assert "density=" in repr(mask) and "heads=3" in repr(mask)
    whole, part = mask.full_and_partial()
    assert torch.equal(whole.to_block_bool() | part.to_block_bool(), mask.to_block_bool())
    assert not (whole.to_block_bool() & part.to_block_bool()).any()
    assert torch.equal(whole.to_dense(), whole.to_block_bool().repeat_interleave(64, 1).repeat_interleave(32, 2)[:, :300, :500])
    full = BlockSparseMask.random(2, 200, 200, 1.0, block_q=64, block_k=64)
    assert full.density() == 1.0
    with pytest.raises(ValueError, match="key block index"):
        BlockSparseMask(mask.offsets, mask.indices + 100, 64, 32, 300, 500)


@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len", [2125, 300])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer_loads", "tma"])
def test_kernel_at_real_size(dtype, q_len, tma):
    """Llama-3-8B attention shape, a chunk against a cache, two padded rows, half the heads streaming."""
    from sparse_attn_hf.kernels.reference import visibility_mask

    case = (2, 32, 8, q_len, 2125, 128)
    q, k, v = _inputs(case, dtype, seed=q_len)
    streaming = torch.arange(8, device=DEVICE) % 2 == 1
    kv_start = torch.tensor([0, 37], device=DEVICE)
    slots = torch.arange(2125, device=DEVICE).expand(2, -1)
    poisoned = torch.full((2, q_len, 32, 128), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(q, k, v, Visibility(kv_start, streaming=streaming, sink=64, local=512,
                                                      q_first=2125 - q_len, k_pos=None),
                                  LogitTerms(128**-0.5), out=poisoned, launch=Launch(tma=tma))
    assert not torch.isnan(out).any()
    mask = visibility_mask(slots[:, 2125 - q_len :], slots, kv_start, streaming, 64, 512)
    golden = masked_sdpa(q.double(), k.double(), v.double(), mask, 128**-0.5)
    assert_close_by_rule(out, golden, masked_sdpa(q, k, v, mask, 128**-0.5))


def test_every_thread_gets_the_descriptor_allocator():
    """Triton keeps its allocator in a context variable that a new thread starts without: the continuous-batching
    loop and a server's workers launch the prefill kernel from their own threads (on a GPU, a missing allocator
    fails the bulk-copy launch)."""
    import threading

    from triton.runtime import _allocation

    from sparse_attn_hf.kernels.prefill import ensure_allocator

    seen = []

    def worker():
        before = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
        ensure_allocator()
        seen.append((before, _allocation._allocator.get() is _allocation._NULL_ALLOCATOR))

    ensure_allocator()  # this thread first: another thread must still get its own
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(True, False)]
