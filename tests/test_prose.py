"""The public-domain prose held out from every fit: checksummed, reachable from the evaluation harness."""

import hashlib

import pytest

from sparse_attn_hf.eval import prose
from sparse_attn_hf.eval.harness import load_haystack


def test_each_text_is_the_file_its_provenance_names():
    for name, file in prose.TEXTS.items():
        data = (prose.FOLDER / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == prose.SHA256[name]
        assert prose.SHA256[name] in (prose.FOLDER / "README.md").read_text()  # the README records the checksum
    assert prose.prose_text("alice").lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "WORKSHOP ON ELECTRONIC TEXTS" in prose.prose_text("lcet10")[:500]


def test_a_damaged_file_is_refused_and_an_unknown_name_named(tmp_path, monkeypatch):
    (tmp_path / "alice29.txt").write_text("Alice was beginning to get very tired")
    monkeypatch.setattr(prose, "FOLDER", tmp_path)
    prose.prose_text.cache_clear()
    try:
        with pytest.raises(ValueError, match="does not match its recorded SHA-256"):
            prose.prose_text("alice")
    finally:
        prose.prose_text.cache_clear()
    with pytest.raises(ValueError, match="use one of alice, lcet10"):
        prose.prose_text("essays")


def test_the_harness_reads_prose_by_name():
    haystack = load_haystack("prose:lcet10")
    assert haystack.sha256 == prose.SHA256["lcet10"] and "lcet10" in haystack.source
    assert len(haystack.text) > 400_000


def test_late_keys_benchmark_rows_on_the_default_model(default_model, tmp_path, monkeypatch):
    """benchmarks/fidelity/late_keys.py at a short length: a row per text, variant and length; the head-mass record
    names each (layer, KV head)'s share on the key and its label."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchmarks.fidelity
    from benchmarks.fidelity import late_keys

    monkeypatch.setattr(late_keys, "load_default_model", lambda: default_model)
    out = tmp_path / "late_keys"
    late_keys.main(["--texts", "alice", "--variants", "shipped,local64", "--lengths", "400", "--depths", "0.9",
                    "--seeds", "0", "--text-tokens", "256", "--heads", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"shipped", "local64"} and rows["local64"]["settings"] == {"local_size": 64}
    for row in rows.values():
        assert row["text"] == "alice" and row["L"] == 400 and row["cells"] == 1
        assert row["lost"] == len(row["lost_cells"]) <= row["dense_correct"] <= 1
        assert row["text_kl"] >= 0 and row["first_token_kl"] >= 0
    [(cell, heads)] = data["meta"]["head_mass"].items()
    model, _ = default_model
    assert cell == "alice L400 d0.9 s0" and 0 < heads["key_distance"] < 100
    assert len(heads["mass"]) == model.config.num_hidden_layers == len(heads["streaming"])
    assert all(0.0 <= share <= 1.0 for layer in heads["mass"] for share in layer)
    assert max(share for layer in heads["mass"] for share in layer) > 0.05  # some head reads the key
    assert (tmp_path / "late_keys.png").exists()
