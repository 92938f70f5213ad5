"""What every benchmark shares: where results go, how they are written (JSON as {"meta": {...}, "rows": [...]},
with the facts needed to trust them), and per-token timestamps inside one ``generate()``.

A script in ``benchmarks/<group>/`` (``e2e``, ``kernels``, ``fidelity``) puts the repository root on ``sys.path``
and imports from here:

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
    from benchmarks.common import RESULTS, StepClock, meta, write_results  # noqa: E402

``benchmarks.common.llama8b`` builds the full-size model shapes (random weights) the GPU benchmarks run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from transformers import StoppingCriteria

RESULTS = Path(__file__).resolve().parent.parent / "results"  # benchmarks/results: what make_tables.py reads


def short_device(name: str) -> str:
    """A card's name as tables and plots print it: 'NVIDIA H100 80GB HBM3' -> 'H100 80GB'."""
    return name.removeprefix("NVIDIA ").split(" HBM")[0]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def meta(device: str, dtype: str, extra: dict | None = None) -> dict:
    """Commit, package versions, device, dtype, command and date of a run."""
    if os.environ.get("SPARSE_ATTN_HF_COMMIT"):  # a copy of the tree (the GPU machine): its .git may be stale
        commit, dirty = os.environ["SPARSE_ATTN_HF_COMMIT"], None
    else:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            commit, dirty = "unknown", None
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device,
        "dtype": dtype,
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "triton", "sparse_attn_hf")},
        **(extra or {}),
    }


def write_results(stem: Path, info: dict, rows: list[dict]) -> Path:
    path = stem.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
    return path


class StepClock(StoppingCriteria):
    """Records a device-synchronized timestamp when each new token is out (generate checks its stopping
    criteria once per token, and synchronizes there anyway). Never stops generation."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores, **kwargs):
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
