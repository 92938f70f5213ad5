"""Run the kernel tests on the GPU and write benchmarks/results/gpu_tests.json (cases, max errors, device).

    python benchmarks/gpu_tests.py                 # every GPU-relevant test file
    python benchmarks/gpu_tests.py tests/a.py ...  # a subset
    GPU_TESTS_TIMEOUT_S=300 python benchmarks/gpu_tests.py   # stop pytest there and keep the cases that finished
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_prefill_kernel.py", "tests/test_reference.py", "tests/test_decode.py",
         "tests/test_sample_attention.py", "tests/test_dense_attention.py", "tests/test_prefill_or_decode.py",
         "tests/test_memory_returned.py", "tests/test_cache.py", "tests/test_window_layers.py",
         "tests/test_logit_terms.py", "tests/test_fp8_pages.py", "tests/test_batching.py",
         "tests/test_block_table_decode.py"]


def main() -> None:
    tests = sys.argv[1:] or TESTS  # a subset when a GPU lease is short
    log = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    # the tests see what this process sees (a lease's wheels ahead of the machine's own packages), then the tree
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, SPARSE_ATTN_HF_ERROR_LOG=str(log), PYTHONPATH=path)
    seen = subprocess.run([sys.executable, "-c", "import transformers, torch; print(transformers.__version__, "
                           "torch.__version__)"], cwd=ROOT, env=env, capture_output=True, text=True).stdout.split()
    print("the tests run on transformers", *seen[:1], "torch", *seen[1:2])
    report = Path(tempfile.mkstemp(suffix=".txt")[1])
    limit = float(os.environ.get("GPU_TESTS_TIMEOUT_S", "0")) or None  # a lease's limit: keep what finished
    command = [sys.executable, "-m", "pytest", "-v", "-rA", "-W", "ignore::FutureWarning", *tests]
    # pytest writes straight into the report, unbuffered: a run stopped at the limit keeps every case that ended
    with report.open("w") as sink:
        child = subprocess.Popen(command, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), stdout=sink,
                                 stderr=subprocess.STDOUT, text=True)
        try:
            code = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            code = 124
    stdout = report.read_text() + (f"\nstopped after {limit:.0f} s (GPU_TESTS_TIMEOUT_S)\n" if code == 124 else "")
    result = subprocess.CompletedProcess(command, code, stdout, "")
    outcomes = {}
    for line in result.stdout.splitlines():
        verbose = re.match(r"^(\S+::\S+) (PASSED|FAILED|ERROR)\b", line)  # as each case ends (-v)
        if verbose:
            outcomes.setdefault(verbose.group(1), verbose.group(2))
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
                extra={"pytest_summary": summary, "tests": tests,
                       "tests_saw": {"transformers": seen[0] if seen else None,
                                     "torch": seen[1] if len(seen) > 1 else None}})
    write_results(RESULTS / "gpu_tests", info, rows)
    print(summary)
    failed = [r["case"] for r in rows if r["outcome"] not in ("PASSED", "SKIPPED")]
    print("not passed:", failed if failed else "none")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
