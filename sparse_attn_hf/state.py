"""PatchState: everything a patched model carries, on the model and on each of its attention modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import head_runs
from .config import SparseConfig
from .padding import left_padding_starts
from .parallel import KVHeadSlice
from .profile import Profile
from .record import CallRecord

ATTENTION_NAME = "sparse_attn_hf"  # the name the package's attention and mask functions are registered under


@dataclass
class PatchState:
    """Everything a patched model carries: on the model and on each attention module."""

    profile: Profile
    settings: SparseConfig  # resolved: no None fields
    streaming: torch.Tensor  # bool [num_layers, KV heads of this process (heads.count)], on the CPU
    previous_attention: str  # the attention implementation stock ran (what a call served as stock runs)
    config: object  # the model's own copy of its config while patched (the caller's object is never edited)
    original_config: object  # the config object the model had before patching (unpatch puts it back)
    heads: KVHeadSlice  # the model's KV heads this process holds (a tensor-parallel rank: its slice)
    windows: list  # per layer: None (full attention) or its native window (models.layer_windows)
    installed: bool = True  # False once unpatch_model ran
    generating: bool = False  # inside the patched generate() (its forwards add to one record)
    prompt_end: int | None = None  # generate(): the slots its prompt fills (known before its first forward)
    prompt_total: int | None = 0  # this forward's prompt length: None, the forward is the whole sequence; 0, unknown
    _splits: dict = field(default_factory=dict)  # per (layer, device) index tensors and streaming flags
    _mask_memo: tuple | None = None
    checked_positions: object = None  # the position_ids of the current forward, once checked
    masks: dict = field(default_factory=dict)  # layer -> last SampleAttention mask (SparseConfig.record_masks)
    sample_choices: dict = field(default_factory=dict)  # layer -> last SampleAttention density, cost, sparse?
    sample_misses: int = 0  # this forward's sampled layers in a row whose masks did not pay (SparseConfig.sample_stop_after)
    record: CallRecord = field(default_factory=CallRecord)  # what the last call ran (``record.last_call``)
    batched_pages: object = None  # continuous batching's page selections between steps (methods.batched_pages)

    @property
    def active(self) -> bool:
        """Whether the model still runs the package's attention: not unpatched, and not switched away
        (``set_attn_implementation`` after patching, or a call being served as stock)."""
        return self.installed and self.config._attn_implementation == ATTENTION_NAME

    def window(self, layer: int) -> int | None:
        """``layer``'s native sliding window (a hybrid model's window layer), or None (full attention)."""
        return self.windows[layer]

    def rule(self, layer: int) -> tuple[int, int, int]:
        """(sink, local window, decode window) of ``layer``'s streaming heads: the settings' on a full-attention
        layer; (0, window, window) on a native window layer, whose every head streams (``models``)."""
        window = self.window(layer)
        if window is None:
            local = self.settings.local_size
            return self.settings.sink_size, local, min(self.settings.decode_local_size, local)
        return 0, window, window

    def head_split(self, layer: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(dense KV head indices, streaming KV head indices) of ``layer``, on ``device`` (cached)."""
        key = (layer, str(device))
        if key not in self._splits:
            dense, stream = self.head_lists(layer)
            self._splits[key] = (torch.tensor(dense, dtype=torch.long, device=device),
                                 torch.tensor(stream, dtype=torch.long, device=device))
        return self._splits[key]

    def head_tables(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense KV heads, streaming KV heads, kind int32 [Hkv] (1 streaming), slot int32 [Hkv] (index among
        its kind)) of ``layer`` on ``device``: built once per model and device, shared by every SparseCache
        (a host-to-device copy per layer and call would synchronize the stream each time)."""
        key = ("tables", layer, str(device))
        if key not in self._splits:
            dense, stream = self.head_lists(layer)
            kind = [0] * (len(dense) + len(stream))
            slot = list(kind)
            for index, head in enumerate(dense):
                slot[head] = index
            for index, head in enumerate(stream):
                kind[head], slot[head] = 1, index
            self._splits[key] = (*self.head_split(layer, device),
                                 torch.tensor(kind, dtype=torch.int32, device=device),
                                 torch.tensor(slot, dtype=torch.int32, device=device))
        return self._splits[key]

    def all_streaming(self, count: int, device) -> torch.Tensor:
        """bool [count] of ones on ``device``: the flags of a call that attends streaming heads only (cached,
        not allocated per layer)."""
        key = ("all_streaming", count, str(device))
        if key not in self._splits:
            self._splits[key] = torch.ones(count, dtype=torch.bool, device=device)
        return self._splits[key]

    def head_lists(self, layer: int) -> tuple[list[int], list[int]]:
        """(dense KV heads, streaming KV heads) of ``layer`` as Python lists (known on the host)."""
        labels = self.streaming[layer].tolist()
        return ([h for h, s in enumerate(labels) if not s], [h for h, s in enumerate(labels) if s])

    def dense_runs(self, layer: int) -> list[tuple[int, int]]:
        """The dense KV heads of ``layer`` as runs [start, stop) of consecutive heads (cached): gathers and
        scatters by slices, which copy at full bandwidth where ``index_select`` does not."""
        key = ("runs", layer)
        if key not in self._splits:
            self._splits[key] = [(first, end) for first, end, _ in head_runs(self.head_lists(layer)[0])]
        return self._splits[key]

    def kv_start_for(self, attention_mask, batch: int, length: int, device) -> torch.Tensor:
        """Left-padding starts of a forward without SparseCache, computed once per mask object and device
        (layers of a model spread over devices by ``device_map`` run on their own device)."""
        if attention_mask is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask and memo[1] == length and memo[2].device == device:
            return memo[2]
        starts = left_padding_starts(attention_mask, batch, length, device)
        self._mask_memo = (attention_mask, length, starts)
        return starts
