"""Import DuoAttention's published attention patterns as profiles.

A pattern folder (for example ``attn_patterns/Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-...``)
holds ``full_attention_heads.tsv``: one line per layer, one tab-separated gate value in [0, 1] per
KV head (1 = the head needs full attention), and ``config.json``: the training settings
(``sink_size``, ``recent_size``, ``lr``, ``reg_weight``, context lengths, ``model_name``...).
The gates become the head scores; the training sink becomes the profile's sink and the training
recent window its decode window (prefill keeps the profile's local window, as LServe deploys them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..profile import Profile, _today, covered_layers, covered_rows, model_shape, weight_fingerprint

TSV = "full_attention_heads.tsv"
_SLACK = 0.01  # published gates lie up to 5e-4 outside [0, 1] (DuoAttention clamps them before use)
CONFIG = "config.json"


def read_gates(path: Path) -> torch.Tensor:
    """float32 [layers, kv_heads] from a Duo TSV, or ``ValueError`` naming the bad line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(cell) for cell in line.strip().split("\t")]
        except ValueError:
            raise ValueError(f"{path}: line {number} holds a value that is not a number: {line[:80]!r}.") from None
        if any(not math.isfinite(v) or not -_SLACK <= v <= 1.0 + _SLACK for v in values):
            raise ValueError(f"{path}: line {number} holds values outside [0, 1] (gates are clamped to [0, 1]).")
        values = [min(max(v, 0.0), 1.0) for v in values]  # the last optimizer step may leave them just outside
        if rows and len(values) != len(rows[0]):
            raise ValueError(f"{path}: line {number} has {len(values)} values, line 1 has {len(rows[0])}.")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path} is empty; expected one line of gate values per layer.")
    return torch.tensor(rows, dtype=torch.float32)


def import_duo(folder: str | Path, model_or_config, **settings) -> Profile:
    """A profile for ``model_or_config`` (a model or its config) from a DuoAttention pattern folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DuoAttention pattern folder {str(folder)!r} does not exist.")
    tsv = folder / TSV
    if not tsv.is_file():
        raise FileNotFoundError(f"{folder} has no {TSV}; give the folder that holds DuoAttention's {TSV}.")
    gates = read_gates(tsv)
    duo = {}
    if (folder / CONFIG).is_file():
        try:
            duo = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / CONFIG} is not valid JSON ({error}).") from None
        if not isinstance(duo, dict):
            raise ValueError(f"{folder / CONFIG} must hold a JSON object.")
    shape = model_shape(model_or_config)
    layers = covered_layers(model_or_config)
    gates = covered_rows(gates, shape["num_layers"], layers)  # a hybrid model's window layers keep their window
    expected = (len(layers), shape["num_kv_heads"])
    if tuple(gates.shape) != expected:
        hint = ""
        if gates.shape == (shape["num_layers"], shape["num_heads"]):
            hint = " (one value per query head: this pattern was made for a model without grouped KV heads)"
        raise ValueError(
            f"{tsv} holds {gates.shape[0]} layers x {gates.shape[1]} heads{hint}, but the model "
            f"({shape['model_type']}) has {expected[0]} layers x {expected[1]} KV heads; use the pattern made "
            "for this model."
        )
    model_name = str(duo.get("model_name", "")).rstrip("/").split("/")[-1]
    settings.setdefault("model_name", model_name)
    if "sink_size" in duo:
        settings.setdefault("sink_size", int(duo["sink_size"]))
    if "recent_size" in duo:
        settings.setdefault("decode_local_size", int(duo["recent_size"]))
    trained = ", ".join(f"{k}={duo[k]}" for k in ("lr", "reg_weight", "num_steps", "sink_size", "recent_size",
                                                  "context_length_min", "context_length_max") if k in duo)
    settings.setdefault("method", f"DuoAttention gates imported from {folder.name}" + (f" ({trained})" if trained else ""))
    settings.setdefault("calibration", str(duo.get("dataset_name", "")))
    settings.setdefault("created", _today())
    fingerprint = weight_fingerprint(model_or_config) if hasattr(model_or_config, "config") else None
    return Profile(head_score=gates, fingerprint=fingerprint, layers=layers, **shape, **settings)
