"""Soft-capping (Gemma 2) and learned sinks (GPT-OSS) in every kernel that computes them, against the references
(CPU interpreter in CI; on a GPU through benchmarks/gpu_tests.py), and the references against a brute force."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, loop_mask

from sparse_attn_hf.kernels.decode import paged_decode_triton
from sparse_attn_hf.kernels.prefill import Launch, sparse_attention_triton
from sparse_attn_hf.kernels.layout import STEP_TAIL, DecodeKV, LogitTerms, Visibility, step_counters
from sparse_attn_hf.kernels.reference import (
    paged_decode_reference,
    sampled_column_scores_reference,
    sparse_attention_reference,
    stripe_attention_reference,
)
from sparse_attn_hf.kernels.sampling import sampled_column_scores_triton
from sparse_attn_hf.methods.sample_attention import SampleSettings, sample_attention_mask, sample_rows

TERMS = {"sinks": (True, None), "softcap": (False, 0.7), "both": (True, 0.7)}


def _terms(name, heads, seed):
    with_sinks, softcap = TERMS[name]
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    return (sinks.float().to(DEVICE) if with_sinks else None), softcap


def _randn(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)


def _brute_force(q, k, v, mask, scale, sinks, softcap):
    """Independent of the references: [B, H, Lq, Lk] scores, capped, masked, a sink column, softmax, drop it."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        column = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("terms", list(TERMS))
def test_reference_terms_equal_a_brute_force(terms):
    batch, heads, kv_heads, length, dim, pads, sink, local = 2, 6, 2, 30, 16, [0, 4], 3, 7
    q, k, v = (_randn(batch, h, length, dim, seed=s, dtype=torch.float64) for s, h in ((1, heads), (2, kv_heads),
                                                                                         (3, kv_heads)))
    sinks, softcap = _terms(terms, heads, 4)
    sinks = None if sinks is None else sinks.double()
    streaming = torch.tensor([True, False], device=DEVICE)
    slots = torch.arange(length, device=DEVICE).expand(batch, -1)
    kv_start = torch.tensor(pads, device=DEVICE)
    out = sparse_attention_reference(q, k, v, Visibility(kv_start, streaming=streaming, sink=sink, local=local,
                                                         q_first=0, k_pos=slots),
                                     LogitTerms(dim**-0.5, softcap, sinks), tile=7)
    mask = loop_mask(slots.cpu(), slots.cpu(), kv_start.cpu(), streaming.cpu(), sink, local).to(DEVICE)
    mask = mask.repeat_interleave(heads // kv_heads, 1)
    torch.testing.assert_close(out, _brute_force(q, k, v, mask, dim**-0.5, sinks, softcap).to(out.dtype))
    if sinks is not None:  # a query that sees no key (a pad) still gets zeros
        assert out[1, :4].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions", ["consecutive", "given"])
@pytest.mark.parametrize("terms", list(TERMS))
def test_prefill_kernel_terms_match_reference(terms, positions, dtype):
    batch, heads, kv_heads, q_len, k_len, dim, pads, sink, local = 2, 6, 2, 21, 37, 32, [0, 5], 3, 7
    seed = 10 * list(TERMS).index(terms) + (positions == "given") + 3 * (dtype == torch.bfloat16)
    q = _randn(batch, heads, q_len, dim, seed=seed, dtype=dtype)
    k = _randn(batch, kv_heads, k_len, dim, seed=seed + 1, dtype=dtype)
    v = _randn(batch, kv_heads, k_len, dim, seed=seed + 2, dtype=dtype)
    sinks, softcap = _terms(terms, heads, seed)
    streaming = torch.tensor([True, False], device=DEVICE)
    kv_start = torch.tensor(pads, device=DEVICE)
    k_pos = None
    slots = torch.arange(k_len, device=DEVICE).expand(batch, -1)
    if positions == "given":
        order = torch.randperm(k_len, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        k, v, k_pos = k[:, :, order], v[:, :, order], slots[:, order].contiguous()
    visible = Visibility(kv_start, streaming=streaming, sink=sink, local=local, q_first=k_len - q_len)
    logit_terms = LogitTerms(dim**-0.5, softcap, sinks)
    out = sparse_attention_triton(q, k, v, visible.but(k_pos=k_pos), logit_terms, launch=Launch(block_n=16))
    ref_visible = visible.but(k_pos=slots if k_pos is None else k_pos)
    golden = sparse_attention_reference(q.double(), k.double(), v.double(), ref_visible, logit_terms)
    baseline = sparse_attention_reference(q, k, v, ref_visible, logit_terms)
    assert_close_by_rule(out, golden, baseline, slack=4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("terms", list(TERMS))
def test_mapped_heads_take_their_own_sinks(terms):
    """With ``heads=`` (the streaming heads of a mixed layer) the kernel reads the sinks of the global query heads
    it writes, as the reference path does for the gathered heads."""
    from sparse_attn_hf import ops

    batch, kv_total, groups, length, dim = 1, 3, 2, 24, 16
    q = _randn(batch, kv_total * groups, length, dim, seed=1, dtype=torch.float16)
    k = _randn(batch, kv_total, length, dim, seed=2, dtype=torch.float16)
    v = _randn(batch, kv_total, length, dim, seed=3, dtype=torch.float16)
    sinks, softcap = _terms(terms, kv_total * groups, 5)
    heads = torch.tensor([2, 0], device=DEVICE)
    outs = []
    for backend in ("triton", "reference"):
        ops.set_backend(backend)
        try:
            out = torch.zeros(batch, length, kv_total * groups, dim, dtype=q.dtype, device=DEVICE)
            visible = Visibility(torch.zeros(1, dtype=torch.long, device=DEVICE),
                                 streaming=torch.ones(2, dtype=torch.bool, device=DEVICE), sink=2, local=5, q_first=0,
                                 k_pos=None, heads=heads, groups=groups, key_all_heads=True)
            outs.append(ops.sparse_attention(q, k, v, visible, LogitTerms(dim**-0.5, softcap, sinks), out=out))
        finally:
            ops.set_backend("auto")
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-3)
    assert outs[0][:, :, 2:4].abs().max() == 0  # KV head 1 was not attended


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", list(TERMS))
def test_decode_kernel_terms_match_reference(terms, dtype, splits):
    """A dense head with selected pages and a tail, a streaming head with sink + ring, and a window layer's head
    (no sink buffer) in one step."""
    batch, groups, dim, page, seen = 2, 3, 32, 16, 90
    seed = 10 * list(TERMS).index(terms) + (dtype == torch.bfloat16) + 2 * splits
    kind = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    slot = torch.tensor([0, 0], dtype=torch.int32, device=DEVICE)
    for sink in (4, 0):
        ring = 16
        kv = DecodeKV(step=step_counters(seen, device=DEVICE), page_size=page, head_kind=kind, head_slot=slot,
                      dense_key=_randn(batch, 1, 128, dim, seed=seed, dtype=dtype),
                      dense_value=_randn(batch, 1, 128, dim, seed=seed + 1, dtype=dtype),
                      pages=torch.tensor([[[0, 2, -1]], [[1, 3, 2]]], dtype=torch.int32, device=DEVICE),
                      sink_key=_randn(batch, 1, sink, dim, seed=seed + 2, dtype=dtype),
                      sink_value=_randn(batch, 1, sink, dim, seed=seed + 3, dtype=dtype),
                      sink_pos=torch.tensor([[0, 1, 2, 3][:sink], [5, 6, 7, 8][:sink]], device=DEVICE),
                      ring_key=_randn(batch, 1, ring, dim, seed=seed + 4, dtype=dtype),
                      ring_value=_randn(batch, 1, ring, dim, seed=seed + 5, dtype=dtype),
                      ring_pos=(torch.arange(seen - ring, seen, device=DEVICE) % 10**6).roll(seen % ring))
        kv.step[STEP_TAIL] = 4
        query = _randn(batch, 2 * groups, dim, seed=seed + 6, dtype=dtype)
        sinks, softcap = _terms(terms, 2 * groups, seed)
        common = (Visibility(torch.tensor([0, 5], device=DEVICE), sink=sink, local=10),
                  LogitTerms(dim**-0.5, softcap, sinks))
        out = paged_decode_triton(query, kv, *common, num_splits=splits)
        as64 = DecodeKV(**{n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                           for n, t in kv.__dict__.items()})
        golden = paged_decode_reference(query.double(), as64, *common)
        baseline = paged_decode_reference(query, kv, *common)
        assert_close_by_rule(out, golden, baseline, slack=4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("terms", list(TERMS))
def test_sampling_kernel_terms_match_reference(terms, dtype):
    """SampleAttention's stage 1 (column scores of sampled rows) and its stripe attention, with the terms."""
    batch, heads, kv_heads, q_len, k_len, dim = 2, 6, 2, 50, 70, 32
    seed = 10 * list(TERMS).index(terms) + (dtype == torch.bfloat16)
    q = _randn(batch, heads, q_len, dim, seed=seed, dtype=dtype)
    k = _randn(batch, kv_heads, k_len, dim, seed=seed + 1, dtype=dtype)
    v = _randn(batch, kv_heads, k_len, dim, seed=seed + 2, dtype=dtype)
    sinks, softcap = _terms(terms, heads, seed)
    kv_start = torch.tensor([0, 7], device=DEVICE)
    rows = sample_rows(q_len, 0.2, device=DEVICE)
    visible, logit_terms = Visibility(kv_start, q_first=k_len - q_len), LogitTerms(dim**-0.5, softcap, sinks)
    common = dict(rows=rows, window=torch.full((batch, kv_heads), 9, dtype=torch.long, device=DEVICE))
    got = sampled_column_scores_triton(q, k, visible, logit_terms, **common)
    golden = sampled_column_scores_reference(q.double(), k.double(), visible, logit_terms, **common)
    assert_close_by_rule(got, golden, sampled_column_scores_reference(q, k, visible, logit_terms, **common), slack=1e-3)
    mask = sample_attention_mask(q, k, visible, logit_terms, SampleSettings(alpha=0.8, rw=0.1, r_row=0.2))
    out = sparse_attention_triton(q, k, v, Visibility(kv_start, streaming=torch.zeros(kv_heads, dtype=torch.bool,
                                                                                        device=DEVICE),
                                                      sink=0, local=1, q_first=k_len - q_len, k_pos=None),
                                  logit_terms, stripe_mask=mask, whole_block_share=0.5, launch=Launch(block_n=16))
    golden = stripe_attention_reference(q.double(), k.double(), v.double(), mask, logit_terms)
    baseline = stripe_attention_reference(q, k, v, mask, logit_terms)
    assert_close_by_rule(out, golden, baseline, slack=4e-3 if dtype == torch.bfloat16 else 5e-4)
