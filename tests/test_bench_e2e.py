"""The end-to-end benchmark's bookkeeping on a tiny model on the CPU (its figures come from a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.e2e
from benchmarks.e2e import bench_e2e  # noqa: E402

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


def test_rows_of_a_second_card_stay_apart_and_name_their_card(tmp_path, monkeypatch):
    """A file holding one card's history takes another card's row without replacing or relabelling the first's,
    and a ratio is never taken against the other card's baseline."""
    from benchmarks import make_tables

    out = tmp_path / "e2e.json"

    def info(card, date):
        return {"date": date, "commit": "abc", "device": card, "dtype": "bfloat16", "model": "Llama-3-8B shape",
                "layers": 32, "packages": {"torch": "t", "transformers": "5", "triton": "3"}, "command": "x",
                "decode_formula": "f", "new_tokens": 64, "settings": {}}

    def row(config, ttft):
        return {"config": config, "L": 1 << 20, "batch": 1, "part": "long", "status": "ok", "ttft_s": ttft,
                "ttft_cold_s": ttft, "decode_ms_per_token": 10.0, "peak_gib": 50.0, "before_gib": 15.0,
                "after_return_gib": 15.0}

    bench_e2e.write(out, info("NVIDIA H200", "d1"), [row("stock", 400.0), row("patched_streaming50", 280.0)])
    bench_e2e.write(out, info("NVIDIA H200", "d2"), [row("patched_streaming50", 270.0)])  # replaces, same card
    bench_e2e.write(out, info("NVIDIA H100 80GB HBM3", "d3"), [row("patched_streaming50", 290.0)])  # kept apart
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["device"], r["ttft_s"]) for r in rows if r["config"] == "patched_streaming50") == [
        ("NVIDIA H100 80GB HBM3", 290.0), ("NVIDIA H200", 270.0)]
    monkeypatch.setattr(make_tables, "RESULTS", tmp_path)
    table = make_tables.e2e_table("e2e.json")
    assert table.startswith("NVIDIA H200 (rows marked with another card: NVIDIA H100 80GB HBM3)")
    h100 = next(line for line in table.splitlines() if "**H100 80GB**" in line)
    h200 = next(line for line in table.splitlines() if "patched_streaming50 |" in line)
    assert "| 290.00 |  |" in h100  # no ratio: stock did not run on that card
    assert "| 270.00 | 0.68† |" in h200  # the same card's stock of another run, marked


def test_pinned_stripes_reach_each_layers_density_and_restore():
    """patched_sample_pinned replays measured densities: layer i's mask must have densities[i]."""
    import torch

    from sparse_attn_hf.methods import sample_attention as sa
    from sparse_attn_hf.ops import LogitTerms, Visibility

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 1024, 32, generator=gen), torch.randn(1, 2, 1024, 32, generator=gen)

    def density():
        return sa.sample_attention_mask(q, k, Visibility(torch.zeros(1, dtype=torch.long), q_first=0),
                                        LogitTerms(32**-0.5),
                                        sa.SampleSettings(alpha=0.95, rw=bench_e2e.PINNED_RW, r_row=0.05)).density()

    try:
        bench_e2e.pin_stripes([0.3, 0.5])
        assert [round(density(), 2) for _ in range(3)] == [0.3, 0.5, 0.3]  # layers in order, then again
    finally:
        bench_e2e.pin_stripes(None)
    assert density() > 0.9  # the measured choice again (random inputs: diffuse attention)


def test_first_call_dry_run_runs_each_variant_in_its_own_process(tmp_path):
    """benchmarks/e2e/first_call.py on a tiny CPU model: a process per variant, the ratios and the patch time."""
    import subprocess

    out = tmp_path / "first_call.json"
    done = subprocess.run([sys.executable, "benchmarks/e2e/first_call.py", "--dry-run", "--variants",
                           "stock,patched_fresh,patched_cached", "--out", str(out)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"stock", "patched_fresh", "patched_cached"} and data["meta"]["device"] == "cpu (dry run)"
    for row in rows.values():
        assert row["status"] == "ok" and len(row["calls"]) == 3
        assert row["first_over_warm"] == row["ttft_first_s"] / row["ttft_warm_s"] > 0
    assert "patch_s" not in rows["stock"] and rows["patched_fresh"]["patch_s"] > 0
    assert rows["patched_fresh"]["triton_cache"] == "shared (emptied first)"
    assert (tmp_path / "first_call.png").exists()


def test_pinned_densities_come_from_lengths_the_model_was_trained_for(tmp_path):
    """The pinned SampleAttention row replays densities measured within the default model's context: a row
    measured past it (positions extended by RoPE scaling) is extrapolation and never chosen, however long."""
    path = tmp_path / "density.json"
    rows = [{"L": 8192, "r_row": 0.025, "density": [0.1, 0.3], "extrapolated": False},
            {"L": 32768, "r_row": 0.025, "density": [0.9, 0.9], "extrapolated": True}]
    path.write_text(json.dumps({"rows": rows}))
    assert bench_e2e.pinned_densities(3, path) == [0.1, 0.1, 0.3]  # layers mapped by depth onto the 8K row
    assert bench_e2e.pinned_densities(2, path) == [0.1, 0.3]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", ["gemma3-12b", "gpt-oss-20b"])
def test_a_family_writes_its_own_rows(tmp_path, family):
    """--family measures another published shape (here its tiny copy): rows carry the family, stock vs patched."""
    out = tmp_path / "families.json"
    bench_e2e.main(["--dry-run", "--family", family, "--lengths", "64", "--batches", "", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {(r["family"], r["config"], r["status"]) for r in data["rows"]} == {
        (family, "stock", "ok"), (family, "patched_default", "ok")}
    assert data["meta"]["model"].startswith(bench_e2e.FAMILY_NAMES[family])
    assert data["meta"]["stock_attention"] in ("sdpa", "eager")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_first_use_bookkeeping(tmp_path, monkeypatch):
    """first_use_gpu.py: a fine-tune's name gets a calibrated profile (timed), a second patch reads the cache."""
    from benchmarks.e2e import first_use_gpu

    monkeypatch.setenv("SPARSE_ATTN_HF_CACHE", str(tmp_path / "unused"))
    out = tmp_path / "first_use.json"
    first_use_gpu.main(["--dry-run", "--out", str(out), "--new-tokens", "12"])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"stock", "calibrated_fresh", "calibrated_cached"}
    assert rows["calibrated_fresh"]["calibration_s"] > 0
    assert rows["calibrated_fresh"]["profile_method"].startswith("calibrated on first use")
    assert rows["calibrated_cached"]["patch_s"] < rows["calibrated_fresh"]["patch_s"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_planted_columns_make_sample_attention_run_sparse(tmp_path):
    """--structured: random weights with planted key columns (four sink tokens per prompt) give SampleAttention
    the structure it is for: inside generate() it runs sparse with a low density (random weights alone: every
    mask too dense, tests/test_sample_attention.py)."""
    out = tmp_path / "structured.json"
    bench_e2e.main(["--dry-run", "--structured", "--lengths", "512", "--batches", "", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"stock", "patched_streaming50", "patched_default"}
    assert {r["family"] for r in rows.values()} == {"llama3-8b+columns"} and "planted" in data["meta"]["model"]
    sample = rows["patched_default"]["sample"]
    assert sample["sparse_layers"] >= 1 and sample["density_mean"] < 0.3, sample
    assert rows["patched_default"]["last_call"]["prefill_sample_attention_layers"] >= 1
    assert "sample" not in rows["patched_streaming50"]  # SampleAttention off there
