"""DuoAttention-style head scores: one trainable gate per (layer, KV head).

Each attention head's output becomes ``g * full + (1 - g) * streaming``, where *full* is causal
attention and *streaming* sees only the first ``sink`` tokens and the last ``local`` ones. With the
model's weights frozen, the gates are trained so that the final hidden states at the answer tokens of
passkey samples stay equal to those of the unchanged model (mean squared error per answer token),
plus an L1 penalty on the gates that pushes the heads that do not need the full context towards 0:

    loss = mean_rows(mean_hidden((h_full - h_gated)^2)) + l1 * mean(|g|)

Published setting (DuoAttention): gates start at 1, AdamW with lr 0.02 and no weight decay, l1 0.05,
a learning rate that warms up over the first fifth of the steps and decays over the last fifth (floor
0.1 x), gates clamped to [0, 1] before every step, sink 128 + local 256, contexts 1K-32K, 2000 steps.
The trained gates are the head scores. One sample per step; CPU runs are bitwise deterministic for a
seed (GPU attention backward kernels may use atomics).
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .._log import logger
from .calibration import Calibration, length_grid

_GATED = "sparse_attn_hf_duo_gates"


@dataclass
class GateSettings:
    steps: int = 2000
    lr: float = 0.02
    l1: float = 0.05
    sink: int = 128
    local: int = 256
    lengths: tuple[int, int] = (1024, 32768)
    seed: int = 0
    checkpointing: bool = False  # recompute activations in backward (long contexts on one GPU)


@dataclass
class GateResult:
    gates: torch.Tensor  # float32 [num_layers, num_kv_heads], in [0, 1]
    losses: list[tuple[float, float]] = field(default_factory=list)  # (distill, l1) per step


class _GatedAttention:
    """The attention function of the student: full and streaming attention mixed by the gates."""

    def __init__(self):
        self.gates: torch.Tensor | None = None
        self.sink = self.local = 0
        self.windows: list = []  # per layer: None, or a native window (models.layer_windows)
        self._masks: dict = {}

    def band(self, length: int, device, sink: int | None = None, local: int | None = None) -> torch.Tensor:
        sink = self.sink if sink is None else sink
        local = self.local if local is None else local
        key = (length, str(device), sink, local)
        if key not in self._masks:
            if any(k[:2] != key[:2] for k in self._masks):
                self._masks.clear()  # masks of one length at a time (each is length^2)
            pos = torch.arange(length, device=device)
            diff = pos[:, None] - pos[None, :]
            self._masks[key] = (diff >= 0) & ((pos[None, :] < sink) | (diff < local))
        return self._masks[key]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # one unpadded sequence per step: the causal and band masks are built here, the model's is unused
        length = query.shape[2]
        if key.shape[2] != length:
            raise ValueError("gate training runs whole sequences without a cache.")
        groups = query.shape[1] // key.shape[1]
        window = self.windows[module.layer_idx] if self.windows else None
        if window is not None:  # a native window layer stays as the model has it (no gate: the profile skips it)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.band(length, query.device, 0, window),
                                                 scale=scaling, enable_gqa=groups > 1)
            return out.transpose(1, 2).contiguous(), None
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        stream = F.scaled_dot_product_attention(query, key, value, attn_mask=self.band(length, query.device),
                                                scale=scaling, enable_gqa=groups > 1)
        gate = self.gates[module.layer_idx].to(query.device, query.dtype).repeat_interleave(groups)
        out = stream + gate[None, :, None, None] * (full - stream)
        return out.transpose(1, 2).contiguous(), None


_gated = _GatedAttention()


@contextlib.contextmanager
def _gated_attention(model, gates: torch.Tensor, sink: int, local: int):
    AttentionInterface.register(_GATED, _gated)
    previous = model.config._attn_implementation
    from ..models import layer_windows

    _gated.gates, _gated.sink, _gated.local = gates, sink, local
    _gated.windows = layer_windows(model.config)
    model.set_attn_implementation(_GATED)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _gated.gates, _gated.windows = None, []
        _gated._masks.clear()


def _lr_factor(step: int, steps: int) -> float:
    """Warm up over the first fifth, decay over the last fifth, never below 0.1 (DuoAttention's)."""
    fifth = max(steps // 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def _checkpointing(model, on: bool) -> None:
    """Activation checkpointing on or off (Transformers renamed the methods in 5.x; both spellings work)."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


def _last_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def train_gates(model, calibration: Calibration, settings: GateSettings, progress=None,
                resume: dict | None = None, on_step=None) -> GateResult:
    """Train the gates of ``model`` (weights frozen, left unchanged) on passkey samples of ``calibration``.

    ``resume``: a :func:`checkpoint_state` of an earlier run with the same settings; training goes on
    from its step and ends with the same gates as an uninterrupted run (sample ``i`` depends only on
    the seed and ``i``). ``on_step(step, state)`` is called after every step with the
    :func:`checkpoint_state` (to save it). ``progress``: a tqdm-like bar, updated once per step.
    """
    text_config = model.config.get_text_config(decoder=True)
    layers = text_config.num_hidden_layers
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    device = next(model.parameters()).device
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_positions is not None and settings.lengths[1] > max_positions:
        raise ValueError(
            f"calibration length {settings.lengths[1]} exceeds the model's {max_positions} positions; "
            f"use --lengths {settings.lengths[0]},{max_positions}."
        )
    if settings.sink + settings.local >= settings.lengths[0]:
        raise ValueError(
            f"the shortest calibration length {settings.lengths[0]} must exceed sink + local = "
            f"{settings.sink + settings.local}, or streaming heads would see everything."
        )
    gates = torch.nn.Parameter(torch.ones(layers, kv_heads, device=device))
    optimizer = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    start_step = 0
    if resume is not None:
        if tuple(resume["gates"].shape) != (layers, kv_heads):
            raise ValueError(f"the checkpoint holds gates of shape {tuple(resume['gates'].shape)}, the model "
                             f"has {layers} layers x {kv_heads} KV heads.")
        start_step = int(resume["step"])
        with torch.no_grad():
            gates.copy_(resume["gates"])
        optimizer.state[gates] = {"step": torch.tensor(float(start_step)), "exp_avg": resume["exp_avg"].to(device),
                                  "exp_avg_sq": resume["exp_avg_sq"].to(device)}
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    if settings.checkpointing:
        _checkpointing(model, True)
        model.train()  # Transformers only checkpoints in training mode; the models here have no dropout
    grid = length_grid(settings.lengths)
    result = GateResult(gates=gates.detach())
    try:
        for step in range(start_step, settings.steps):
            rng = random.Random(f"{settings.seed}:{step}")
            sample = calibration.sample(rng, rng.choice(grid))
            ids = sample.input_ids.to(device)
            rows = sample.answer_rows
            with torch.no_grad():
                target = _last_hidden(model, ids)[0, rows].float()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, settings.steps)
            # backward inside the block: activation checkpointing re-runs the gated attention there
            with _gated_attention(model, gates, settings.sink, settings.local):
                hidden = _last_hidden(model, ids)[0, rows].float()
                distill = (hidden - target).pow(2).mean(-1).mean()
                l1 = gates.abs().mean()
                loss = distill + settings.l1 * l1
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            result.losses.append((distill.item(), l1.item()))
            if progress is not None:
                progress.set_postfix(distill=f"{distill.item():.3g}", gates=f"{l1.item():.3f}", len=ids.shape[1])
                progress.update(1)
            if on_step is not None:
                on_step(step + 1, checkpoint_state(step + 1, gates, optimizer))
    finally:
        if settings.checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    with torch.no_grad():
        result.gates = gates.detach().clamp(0.0, 1.0).cpu()
    logger.log(logging.INFO, "gate training: %d steps, last distill loss %.4g", settings.steps,
               result.losses[-1][0] if result.losses else float("nan"))
    return result


def checkpoint_state(step: int, gates: torch.Tensor, optimizer) -> dict:
    """What resumes a run: the step, the gates and AdamW's moments (CPU tensors)."""
    state = optimizer.state[gates]
    return {"step": step, "gates": gates.detach().cpu().clone(), "exp_avg": state["exp_avg"].detach().cpu().clone(),
            "exp_avg_sq": state["exp_avg_sq"].detach().cpu().clone()}
