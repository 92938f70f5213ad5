"""A light sweep of SampleAttention's hyperparameters on calibration prompts.

Every setting (alpha, rw, r_row) runs with the profile's head labels and SampleAttention forced on
(``dense_below=0``), against the *reference*: the same labels with SampleAttention off (alpha 1), so
the sweep measures what SampleAttention adds. A setting passes when its greedy passkey answers equal
the reference's on every sweep prompt and its mean next-token KL(reference || setting) on held-out
text is at most ``kl_tolerance``. The chosen setting is the passing one that computes the least
attention (mean SampleAttention mask density over layers and prompts, the work the prefill kernel
does); equal densities keep the earlier setting of the grid. No passing setting: SampleAttention is
switched off in the profile (alpha 1).

The dense-below length (SampleAttention gains nothing on short inputs) is a speed property: on a GPU
it is measured as the shortest length at which the chosen setting's prefill is faster than the
reference's; on a CPU it is not measured and the given value is kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time

import torch
import torch.nn.functional as F

from .._log import logger
from ..api import patched
from ..config import SparseConfig

REFERENCE = SparseConfig(alpha=1.0)


@dataclasses.dataclass
class SweepSettings:
    alphas: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98)
    rws: tuple[float, ...] = (0.04, 0.08)
    r_rows: tuple[float, ...] = (0.05,)
    kl_tolerance: float = 0.02
    text_tokens: int = 2048
    max_new_tokens: int = 8


@torch.no_grad()
def _answer(model, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(ids.to(model.device), use_cache=False).logits[0].float(), dim=-1)


def _density(model) -> float:
    masks = model._sparse_attn_state.masks
    return sum(mask.density() for mask in masks.values()) / len(masks) if masks else 1.0


def run_sweep(model, profile, prompts: list[torch.Tensor], text_ids: torch.Tensor, settings: SweepSettings,
              progress=None) -> dict:
    """The sweep's table and choice, as a JSON-ready dict (stored in the profile's ``sweep`` field)."""
    if not prompts:
        raise ValueError("the SampleAttention sweep needs at least one calibration prompt.")
    with patched(model, profile, REFERENCE):
        reference_answers = [_answer(model, ids, settings.max_new_tokens) for ids in prompts]
        reference_logp = _log_probs(model, text_ids)
    rows = []
    grid = list(itertools.product(settings.alphas, settings.rws, settings.r_rows))
    for alpha, rw, r_row in grid:
        config = SparseConfig(alpha=alpha, rw=rw, r_row=r_row, dense_below=0, record_masks=True, sample_stop_after=0)
        with patched(model, profile, config):
            same, densities = 0, []
            for ids, expected in zip(prompts, reference_answers):
                same += _answer(model, ids, settings.max_new_tokens) == expected
                densities.append(_density(model))
            logp = _log_probs(model, text_ids)
            densities.append(_density(model))
        kl = float((reference_logp.exp() * (reference_logp - logp)).sum(-1).mean())
        passed = same == len(prompts) and kl <= settings.kl_tolerance
        rows.append({"alpha": alpha, "rw": rw, "r_row": r_row, "answers_equal": same, "prompts": len(prompts),
                     "kl": round(kl, 6), "density": round(sum(densities) / len(densities), 4), "passed": passed})
        if progress is not None:
            progress.set_postfix(alpha=alpha, rw=rw, kl=f"{kl:.4f}", ok=passed)
            progress.update(1)
    passing = [row for row in rows if row["passed"]]
    chosen = min(passing, key=lambda row: row["density"]) if passing else None
    return {
        "reference": "the same head labels with SampleAttention off (alpha 1)",
        "criterion": f"passkey answers equal on all {len(prompts)} prompts and mean next-token KL <= "
                     f"{settings.kl_tolerance} on {text_ids.shape[1]} held-out tokens; least mask density wins",
        "prompt_tokens": [int(ids.shape[1]) for ids in prompts],
        "rows": rows,
        "chosen": None if chosen is None else {k: chosen[k] for k in ("alpha", "rw", "r_row")},
    }


@torch.no_grad()
def measure_dense_below(model, profile, chosen: dict, tokens: list[int], lengths: list[int], repeats: int = 3) -> dict:
    """On a GPU: prefill time with the chosen setting and with the reference at each length; the
    shortest length from which SampleAttention is faster at this and every longer length measured."""
    if model.device.type != "cuda":
        raise ValueError("the dense-below length is measured on a GPU only.")
    timings = []
    for length in lengths:
        ids = torch.tensor([(tokens * (length // len(tokens) + 1))[:length]], device=model.device)
        row = {"length": length}
        for name, config in (("dense_ms", REFERENCE), ("sample_ms", SparseConfig(dense_below=0, **chosen))):
            with patched(model, profile, config):
                model(ids, use_cache=False)  # compile and warm up
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(ids, use_cache=False)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
            row[name] = round(best * 1e3, 3)
        timings.append(row)
    crossover = None
    for i, row in enumerate(timings):
        if all(later["sample_ms"] < later["dense_ms"] for later in timings[i:]):
            crossover = row["length"]
            break
    logger.log(logging.INFO, "SampleAttention crossover: %s", crossover)
    return {"timings": timings, "crossover": crossover}


def sweep_summary(sweep: dict) -> str:
    chosen = sweep.get("chosen")
    lines = [f"{'alpha':>6} {'rw':>6} {'r_row':>6} {'answers':>8} {'KL':>9} {'density':>8}  pass"]
    for row in sweep["rows"]:
        mark = " <- chosen" if chosen and all(row[k] == chosen[k] for k in chosen) else ""
        lines.append(f"{row['alpha']:>6} {row['rw']:>6} {row['r_row']:>6} "
                     f"{row['answers_equal']:>3}/{row['prompts']:<4} {row['kl']:>9.5f} {row['density']:>8.3f}  "
                     f"{'yes' if row['passed'] else 'no'}{mark}")
    if chosen is None:
        lines.append("no setting passed: SampleAttention is off in this profile (alpha 1)")
    return "\n".join(lines)


def to_json(sweep: dict) -> str:
    return json.dumps(sweep, separators=(",", ":"))
