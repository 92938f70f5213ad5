"""FP8 pages of a SparseCache layer (``SparseConfig(kv_dtype="fp8")``): how a prefill stores the dense heads' tokens
as e4m3 pages and reads the stored past back (the format, the ring of recent tokens and its sealing rule:
``kernels.fp8``; a decode step's token is stored by ``ops.append_token``)."""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.fp8 import first_recent_page, quantize_pages

_FP8_CHUNK = 1 << 16  # tokens quantized per step (bounds the float32 temporaries)


class FP8Pages:
    """The FP8 half of ``SparseLayer``'s prefill storage (a mixin: it reads the layer's buffers, ``_tensors``, and
    refreshes its page statistics)."""

    def _dense_of(self, x: torch.Tensor) -> torch.Tensor:
        """The dense heads of x [B, Hkv, n, D] (x itself when every head is dense)."""
        return x if len(self.dense_heads) == x.shape[1] else x.index_select(1, self.dense_idx)

    @torch.no_grad()
    def _append_dense_fp8(self, key, value, first: int, kv_start):
        """``_append_dense`` for FP8 pages (``kernels.fp8``): the ring's tokens and the new ones, padding zeroed,
        give the statistics (unquantized keys); the pages that leave the ring are quantized into the e4m3 buffers
        with their scales, the newest pages go to the ring. Returns what the prefill attends to in the model's
        dtype: the new tokens as they came (a first chunk), else the stored past read back, then the new tokens."""
        t, page = self._tensors, self.page_size
        recent = t["recent_key"].shape[2]
        n = key.shape[2]
        end = first + n
        base = first_recent_page(first, page, recent) * page  # the ring's first slot before this chunk
        sealed = first_recent_page(end, page, recent) * page  # ... and after it: pages before it are sealed
        new_key, new_value = self._dense_of(key), self._dense_of(value)
        ring = torch.arange(base, first, device=key.device) % recent  # the ring's tokens, in slot order
        parts = []
        for new, name in ((new_key, "key"), (new_value, "value")):
            part = torch.cat([t["recent_" + name].index_select(2, ring), new], dim=2) if first > base else new
            if base < self.sequence.max_kv_start:  # a row's padding: stored as zeros, out of every page's scale
                slots = torch.arange(base, end, device=part.device)
                part = part.masked_fill((slots[None, :] < kv_start[:, None])[:, None, :, None], 0)
            parts.append(part)
        self._refresh_page_statistics(first, end, kv_start, source=parts[0], base=base)
        kept = max(sealed, base)  # slots kept..end-1, the newest pages, go to the ring
        places = torch.arange(kept, end, device=key.device) % recent
        for part, name in zip(parts, ("key", "value")):
            codes, scales = t["dense_" + name], t[name + "_scale"]
            for lo in range(base, sealed, _FP8_CHUNK):
                hi = min(lo + _FP8_CHUNK, sealed)
                codes[:, :, lo:hi], scales[:, :, lo // page : hi // page] = quantize_pages(
                    part[:, :, lo - base : hi - base], page)
            t["recent_" + name].index_copy_(2, places, part[:, :, kept - base :])
        if first == 0:
            return new_key, new_value
        return tuple(self._read_back(name, base, part) for name, part in zip(("key", "value"), parts))

    def _read_back(self, name: str, base: int, rest: torch.Tensor) -> torch.Tensor:
        """The pages sealed before slot ``base`` of an FP8 layer's ``name`` buffers read back in the model's dtype,
        then ``rest`` (the slots from ``base`` on, as they came): what a later prompt chunk attends to (one
        temporary of the layer's dense heads; ``ops.read_fp8_pages``)."""
        t, page = self._tensors, self.page_size
        out = rest.new_empty(*rest.shape[:2], base + rest.shape[2], rest.shape[3])
        ops.read_fp8_pages(t["dense_" + name][:, :, :base], t[name + "_scale"][:, :, : base // page], page,
                           out[:, :, :base])
        out[:, :, base:] = rest
        return out
