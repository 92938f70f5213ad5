"""Streaming heads (LServe / DuoAttention): when their window pays in prefill.

A streaming head sees its first ``sink`` tokens and a local window of ``local``; the rule itself is the settings'
(``PatchState.rule``). On a short prompt the window covers most of it, and the sparse kernel would cost more than
dense attention: then the whole prompt runs every head dense, which is exact."""

from __future__ import annotations

from .. import cost


def dense_prompt(prompt_total: int | None, *, streaming_from: int | None, sink: int, local: int, window_layer: bool,
                 n_stream: int, first: int, q_len: int) -> int:
    """The length of the prompt this forward belongs to when the whole prompt runs every head dense (its
    streaming heads' window would cover so much of it that the sparse kernel costs more than dense attention),
    else 0. Decided from the whole prompt, never from one chunk, so that chunking never changes the answer: its
    length (``prompt_total``) is known in ``generate()`` (the prompt's end) and in a forward with no cache passed
    in (None: the forward is the sequence); a forward on a cache the caller passes keeps the window (more chunks
    may follow). ``streaming_from`` (``SparseConfig``) replaces the cost model's break-even length."""
    total = first + q_len if prompt_total is None else prompt_total
    if window_layer or not n_stream or not first + q_len <= total:
        return 0
    if streaming_from is not None:
        return 0 if total >= streaming_from else total
    return 0 if cost.streaming_pays(0, total, sink, local) else total
