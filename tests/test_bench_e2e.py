"""The end-to-end benchmark's bookkeeping on a tiny model on the CPU (its figures come from a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_e2e  # noqa: E402

ROW_FIELDS = {"config", "L", "batch", "part", "args", "status", "ttft_s", "ttft_cold_s", "decode_ms_per_token",
              "tokens_per_s", "run"}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dry_run_writes_the_schema_and_merges_parts(tmp_path):
    out = tmp_path / "e2e.json"
    bench_e2e.main(["--dry-run", "--lengths", "64", "--batches", "", "--out", str(out),
                    "--configs", "stock,patched_streaming50,stock_static_compile"])
    data = json.loads(out.read_text())
    assert {"commit", "device", "packages", "settings", "runs", "layers", "decode_formula"} <= data["meta"].keys()
    assert set(data["meta"]["settings"]) == {"patched_streaming50"}
    assert data["meta"]["settings"]["patched_streaming50"]["alpha"] == 1.0
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"stock", "patched_streaming50", "stock_static_compile"}
    for row in rows.values():
        assert ROW_FIELDS <= row.keys() and row["status"] == "ok", row
        assert row["decode_ms_per_token"] > 0 and row["ttft_s"] > 0
        assert row["run"] in data["meta"]["runs"]
        assert row["args"]["max_new_tokens"] == 12 and row["args"]["eos_token_id"] is None
    assert "decode_ms_per_token_repeated" in rows["stock"] and "compile_s" in rows["stock_static_compile"]
    assert (tmp_path / "e2e.png").exists()
    # a second part is merged in; rows of the first stay, a row run again is replaced, no row stays "running"
    bench_e2e.main(["--dry-run", "--part", "long", "--lengths", "96", "--out", str(out),
                    "--configs", "stock,patched_streaming50"])
    data = json.loads(out.read_text())
    keys = [(r["part"], r["config"], r["L"]) for r in data["rows"]]
    assert len(keys) == len(set(keys)) == 5
    assert ("long", "stock", 96) in keys and ("core", "stock", 64) in keys
    assert not any(r["status"] == "running" for r in data["rows"])
    long_stock = next(r for r in data["rows"] if r["part"] == "long" and r["config"] == "stock")
    assert long_stock["status"] in ("not_run", "oom_predicted") and "KiB per token" in long_stock["reason"]
