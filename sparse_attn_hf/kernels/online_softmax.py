"""The online-softmax steps every kernel shares (prefill, decode, SampleAttention's sampling, page selection):
scores in log2 units with an optional soft cap, one block's update, and a learned sink folded in."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logits(q, k, scale_log2, softcap_log2, PRECISION: tl.constexpr):
    """Scaled scores in log2 units; soft-capped (``cap * tanh(s / cap)``, Gemma 2) when ``softcap_log2`` (the cap
    in log2 units) is positive."""
    scores = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if softcap_log2 > 0:
        scores = softcap_log2 * _tanh(scores / softcap_log2)
    return scores


@triton.jit
def _merge_sink(acc, m_i, l_i, sink_log2):
    """Fold one extra logit per row (a learned sink, GPT-OSS; log2 units) into the online softmax: it takes its
    share of the denominator and adds no value."""
    m_new = tl.maximum(m_i, sink_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.exp2(sink_log2 - m_safe)


@triton.jit
def _softmax_step(acc, m_i, l_i, scores, v, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update with one block's scores (log2 units) and values."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    else:
        m_safe = m_new  # an unmasked block gives every row a finite score
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i
