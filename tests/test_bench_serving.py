"""The serving benchmark's bookkeeping on a tiny model on the CPU (its figures come from a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.e2e
from benchmarks.e2e import bench_serving  # noqa: E402

from sparse_attn_hf import batching  # noqa: E402


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dry_run_rows_ratios_and_answers(tmp_path):
    out = tmp_path / "serving.json"
    bench_serving.main(["--dry-run", "--configs", "patched,stock", "--arrivals", "together", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"patched", "stock"} and all(r["status"] == "ok" for r in rows.values())
    for row in rows.values():
        assert row["tokens"] == 3 * 6 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_mean_s"] <= row["ttft_p95_s"] <= row["ttft_max_s"] <= row["seconds"]
        assert row["run"] in data["meta"]["runs"]
    patched = rows["patched"]
    assert patched["attention"] == "sparse_attn_hf" and rows["stock"]["attention"] != "sparse_attn_hf"
    # float32 on the CPU: each checked request equals the patched generate() token for token
    assert patched["same_prefix"] == [6, 6] and patched["same_as_generate"] == 2
    assert patched["tokens_per_s_x_stock"] == pytest.approx(patched["tokens_per_s"] / rows["stock"]["tokens_per_s"])
    # past the dry run's token budget every request selects at its first and fifth decode steps, in the one layer
    # with dense heads (the seeded profile streams the other's two KV heads)
    assert patched["page_selections"] == 3 * 2 * 1 and rows["stock"]["page_selections"] == 0
    assert batching.ON_GPU is True  # the package's default, left as it was
    assert (tmp_path / "serving.png").exists()
