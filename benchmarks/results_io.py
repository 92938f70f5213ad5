"""Benchmark results: JSON as {"meta": {...}, "rows": [...]}, with the facts needed to trust them."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


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
