"""Decode steps replayed from a CUDA graph inside ``generate()``.

An eager decode step of a patched model is bound by Python and kernel launches (about 50 ms per token on the
8B shape), while its GPU work is a few ms. A SparseCache keeps every step-dependent value on the device (the
step counters of ``methods.decode_step.DecodePlan``, fixed-width page tables, buffers sized for the whole
generation), so the model's whole one-token forward can be captured once and replayed:

* the first ``WARMUP`` decode steps run eagerly (the ring shrinks to the decode window, kernels compile);
* the next step is captured on a side stream, with the token ids and the positions as static inputs and no
  attention mask (decode steps take the padding from the cache's ``kv_start``), then replayed. Positions the
  caller does not pass are the ones the model would compute from the cache's length (``position_ids`` =
  ``cache_position`` = the slot), filled in before each replay;
* every later step copies its inputs into the static tensors, replays, and advances the host-side token
  counts the eager path would have advanced.

A step runs eagerly instead (and the reason is logged once) when replaying it would not be the same
computation: not CUDA, a step that runs the PyTorch reference (fp32, an unusual head_dim or page size: it
reads device values on the host), inputs other than one token per row, outputs the graph does not make (attentions,
hidden states), other keyword arguments than at capture, a cache whose buffers moved (beam search reorders
them) or would have to grow, or a failed capture.
"""

from __future__ import annotations

import inspect
import time

import torch

from ._log import warn_once
from .methods.decode_step import DecodePlan

WARMUP = 2  # eager decode steps before the capture
last_capture: dict = {}  # the last capture's cost: {"seconds": wall time, "graph_bytes": memory the graph keeps}
_streams: dict = {}  # one capture stream per device: libraries keep per-stream workspaces (cuBLAS: 32 MiB)


class DecodeGraph:
    """Replaces ``model.forward`` for the decode steps of one ``generate()`` call over ``cache``."""

    def __init__(self, model, cache):
        self.cache = cache
        self.record = model._sparse_attn_state.record  # this call's record (``record.CallRecord``)
        self.forward = model.forward  # the bound method (or accelerate's wrapper) generate would call
        # generate() reads the forward's parameters (position_ids from the mask for a padded batch,
        # logits_to_keep so that a prefill makes one row of logits, not one per token): show it the model's
        self.__signature__ = inspect.signature(self.forward)
        self.eager_steps = 0
        self.graph = None
        self.failed = False
        self.static: dict[str, torch.Tensor] = {}
        self.other: dict = {}
        self.output = None
        self.buffers: tuple = ()
        self.positions: list[torch.Tensor] = []  # positions the caller does not pass, filled per step

    # ------------------------------------------------------------------ the forward generate calls
    def __call__(self, *args, **kwargs):
        why = self._why_eager(args, kwargs)
        if why is not None:
            if why:
                self.record.eager(why)
                warn_once(f"sparse_attn_hf: decode steps run eagerly, not from a CUDA graph: {why}.")
            return self.forward(*args, **kwargs)
        if self.graph is None:
            if self.eager_steps < WARMUP:
                self.eager_steps += 1
                self.record.eager("warm-up before the capture")
                return self.forward(**kwargs)
            if not self._capture(kwargs):
                self.record.eager("the capture failed")
                return self.forward(**kwargs)
            self.graph.replay()  # the captured step itself (capture records, it does not run)
        else:
            for name, tensor in self.static.items():
                tensor.copy_(kwargs[name])
            for tensor in self.positions:
                tensor.fill_(self.cache.get_seq_length())  # a kernel argument, no host synchronization
            self.graph.replay()
            self.cache.advance()  # the host-side counts the eager step advances
        self.record.decode_steps += 1
        self.record.graph_steps += 1
        out = self.output.__class__(**{k: v for k, v in self.output.items()})
        out["logits"] = self.output["logits"].clone()  # the next replay overwrites the static one
        return out

    def _why_eager(self, args, kwargs) -> str | None:
        """None when the step may be replayed; "" for a forward that is not a decode step at all (no log),
        else the reason."""
        ids = kwargs.get("input_ids")
        if args or ids is None or ids.ndim != 2 or ids.shape[1] != 1 or not ids.is_cuda:
            return ""
        layers = [layer for layer in self.cache.layers if layer.is_initialized]
        if not layers or not self.cache.sequence.is_decode_step(layers[0].seen, 1):
            return ""
        if self.failed:
            return "the capture failed (see the first message)"
        if kwargs.get("inputs_embeds") is not None or kwargs.get("output_attentions") or kwargs.get(
                "output_hidden_states"):
            return "the call asks for attentions, hidden states or embeddings, which the graph does not make"
        blocked = DecodePlan.why_not_replayable(layers, ids.device)
        if blocked:
            return blocked
        if self.graph is not None:
            if self.cache.buffer_addresses() != self.buffers:
                return "the cache's buffers moved (beam search reorders them)"
            if not _same_arguments(self.other, {k: v for k, v in kwargs.items()
                                                if k not in self.static and k != "attention_mask"}):
                return "the call's arguments differ from the captured step's"
            if any(kwargs[name].shape != tensor.shape for name, tensor in self.static.items()):
                return "the call's shapes differ from the captured step's"
        return None

    # ------------------------------------------------------------------ capture
    def _capture(self, kwargs) -> bool:
        tensors = {name: kwargs[name] for name in ("input_ids", "position_ids", "cache_position")
                   if isinstance(kwargs.get(name), torch.Tensor)}
        self.static = {name: tensor.clone() for name, tensor in tensors.items()}
        self.other = {k: v for k, v in kwargs.items() if k not in tensors and k != "attention_mask"}
        device, slot = self.static["input_ids"].device, self.cache.get_seq_length()
        made = {}
        if "position_ids" not in tensors:  # what the model would compute from the cache's length
            made["position_ids"] = torch.full((1, 1), slot, dtype=torch.long, device=device)
        if "cache_position" not in tensors and "cache_position" in inspect.signature(self.forward).parameters:
            made["cache_position"] = torch.full((1,), slot, dtype=torch.long, device=device)
        self.positions = list(made.values())
        seen = self.cache.lengths()
        start = time.perf_counter()  # once per generate(): the capture's cost is measured
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device=device)
        stream = _streams[device]
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end, not torch.cuda.graph: that context empties the allocator's cache on entry, which hands
        # the prefill's freed blocks back to the driver (hundreds of ms after a long prompt, and the next prompt
        # must allocate them again); the graph's private pool is what grows either way
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin()
                try:
                    self.output = self.forward(**self.static, **made, **self.other)
                finally:
                    graph.capture_end()
        except Exception as error:  # noqa: BLE001 - any capture failure: run eagerly, say why once
            self.cache.set_lengths(seen)  # the capture ran the Python, not the kernels
            self.failed = True
            warn_once(f"sparse_attn_hf: capturing the decode step in a CUDA graph failed ({type(error).__name__}: "
                      f"{error}); decode steps run eagerly.")
            return False
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph
        self.buffers = self.cache.buffer_addresses()
        torch.cuda.synchronize(device)
        last_capture.update(seconds=time.perf_counter() - start,
                            graph_bytes=torch.cuda.memory_reserved(device) - reserved)
        return True


def _same_arguments(captured: dict, now: dict) -> bool:
    """The same keywords with the same values (objects and tensors: the same objects)."""
    if captured.keys() != now.keys():
        return False
    return all(a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
               for a, b in ((captured[k], now[k]) for k in captured))
