"""Run the kernel tests on the GPU and write benchmarks/results/gpu_tests.json (cases, max errors, device).

    python benchmarks/gpu_tests.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import meta, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_prefill_kernel.py", "tests/test_reference.py", "tests/test_decode.py",
         "tests/test_sample_attention.py"]


def main() -> None:
    log = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    env = dict(os.environ, SPARSE_ATTN_HF_ERROR_LOG=str(log), PYTHONPATH=str(ROOT))
    report = Path(tempfile.mkstemp(suffix=".txt")[1])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", *TESTS], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    report.write_text(result.stdout + result.stderr)
    outcomes = {}
    for line in result.stdout.splitlines():
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            if line.startswith(word + " "):
                case = line.split(" ")[1]
                if word == "SKIPPED" and case.startswith("["):  # "SKIPPED [1] path:line: reason"
                    case = line.split(" ", 2)[2]
                outcomes[case] = word
    errors = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [{"case": case, "outcome": outcome, **next((e for e in errors if e["case"] == case), {})}
            for case, outcome in outcomes.items()]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    info = meta(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", dtype="fp16/bf16",
                extra={"pytest_summary": summary, "tests": TESTS})
    write_results(ROOT / "benchmarks" / "results" / "gpu_tests", info, rows)
    print(summary)
    failed = [r["case"] for r in rows if r["outcome"] not in ("PASSED", "SKIPPED")]
    print("not passed:", failed if failed else "none")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
