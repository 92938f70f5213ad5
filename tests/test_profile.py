"""Profiles: round trip, deterministic labels, and every kind of bad file or mismatch."""

import dataclasses

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import save_file

from sparse_attn_hf import Profile, SparseConfig, patch_model
from sparse_attn_hf.profile import format as profile_module


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", heads=6, kv_heads=3, layers=3)


def _scores(model, seed=0):
    return torch.rand(3, 3, generator=torch.Generator().manual_seed(seed))


def test_round_trip(model, tmp_path):
    profile = Profile.from_scores(model, _scores(model), sink_size=8, local_size=32, model_name="tiny")
    path = profile.save(tmp_path / "p.safetensors")
    loaded = Profile.load(path)
    assert torch.equal(loaded.head_score, profile.head_score)
    assert torch.equal(loaded.fingerprint, profile.fingerprint)
    for field in dataclasses.fields(Profile):
        if field.name not in ("head_score", "fingerprint", "source"):
            assert getattr(loaded, field.name) == getattr(profile, field.name), field.name
    assert loaded.source == path
    loaded.validate_for(model)


def test_labels_follow_scores_and_break_ties_by_layer_then_head(model):
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.5, 0.2], [0.5, 1.0, 0.0]])
    profile = Profile.from_scores(model, scores)
    labels = profile.streaming_heads(4 / 9)
    # lowest: 0.0 (2,2), 0.1 (0,1), 0.2 (1,2), then the first 0.5 in (layer, head) order: (0,2)
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[2, 2] = expected[0, 1] = expected[1, 2] = expected[0, 2] = True
    assert torch.equal(labels, expected)
    assert torch.equal(profile.streaming_heads(4 / 9), labels)  # deterministic
    assert profile.streaming_heads(0.0).sum() == 0 and profile.streaming_heads(1.0).all()


def test_uniform_scores_give_a_deterministic_split(model):
    profile = Profile.from_scores(model, torch.full((3, 3), 0.5))
    assert profile.streaming_heads(0.5).flatten().tolist() == [True] * 5 + [False] * 4  # 4.5 rounds up


def test_another_models_profile_is_rejected(model):
    other = tiny_model("llama", heads=4, kv_heads=2, layers=3)
    profile = Profile.from_scores(other, torch.rand(3, 2))
    with pytest.raises(ValueError, match="num_heads: profile 4, model 6"):
        profile.validate_for(model)
    with pytest.raises(ValueError, match="does not fit"):
        patch_model(model, profile)


def test_profile_for_other_weights_is_rejected_unless_asked(model):
    twin = tiny_model("llama", heads=6, kv_heads=3, layers=3, seed=7)  # same shapes, other weights
    with torch.no_grad():
        twin.get_input_embeddings().weight.mul_(3.0)
    profile = Profile.from_scores(twin, _scores(twin), model_name="twin")
    with pytest.raises(ValueError, match="other weights"):
        profile.validate_for(model)
    dataclasses.replace(profile, fingerprint=None).validate_for(model)


def test_wrong_model_type_is_rejected(model):
    profile = dataclasses.replace(Profile.from_scores(model, _scores(model)), model_type="mistral")
    with pytest.raises(ValueError, match="model_type: profile 'mistral', model 'llama'"):
        profile.validate_for(model)


@pytest.mark.parametrize(
    "scores, message",
    [
        (torch.full((3, 3), float("nan")), "NaN"),
        (torch.rand(3, 2), "shape"),
        (torch.full((3, 3), 1.5), r"\[0, 1\]"),
    ],
)
def test_bad_scores_are_rejected(model, scores, message):
    with pytest.raises(ValueError, match=message):
        Profile.from_scores(model, scores)


def _write(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def _good_metadata():
    return {"format_version": "1", "model_type": "llama", "num_layers": "3", "num_heads": "6",
            "num_kv_heads": "3", "head_dim": "16"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: m.pop("num_heads"), "'num_heads' is missing"),
        (lambda t, m: m.pop("format_version"), "format_version"),
        (lambda t, m: m.update(format_version="9"), "format_version 9"),
        (lambda t, m: m.update(sink_size="many"), "sink_size='many'"),
        (lambda t, m: t.pop("head_score"), "'head_score' is missing"),
        (lambda t, m: t.update(head_score=torch.full((3, 3), float("nan"))), "NaN"),
        (lambda t, m: t.update(head_score=torch.rand(2, 3)), "shape"),
    ],
)
def test_bad_files_are_rejected(tmp_path, edit, message):
    tensors, metadata = {"head_score": torch.rand(3, 3), "other": torch.zeros(1)}, _good_metadata()
    edit(tensors, metadata)
    path = _write(tmp_path / "p.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=message):
        Profile.load(path)


def test_truncated_and_foreign_files_are_rejected(model, tmp_path):
    path = Profile.from_scores(model, _scores(model)).save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("layer\thead\tscore\n0\t0\t0.5\n")
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match="not a readable safetensors profile"):
            Profile.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "missing.safetensors")


def test_shipped_profile_is_found_by_weights(model, tmp_path, monkeypatch):
    mine = Profile.from_scores(model, _scores(model), model_name="mine").save(tmp_path / "mine.safetensors")
    twin = tiny_model("llama", heads=6, kv_heads=3, layers=3, seed=5)
    with torch.no_grad():
        twin.get_input_embeddings().weight.mul_(2.0)
    other = Profile.from_scores(twin, _scores(twin, 1), model_name="twin").save(tmp_path / "twin.safetensors")
    monkeypatch.setattr(profile_module, "shipped_profile_paths", lambda: [other, mine])
    assert profile_module.find_profile(model).model_name == "mine"
    assert profile_module.find_profile(twin).model_name == "twin"
    stranger = tiny_model("llama", heads=6, kv_heads=3, layers=3, seed=9)
    with torch.no_grad():
        stranger.get_input_embeddings().weight.mul_(5.0)
    with pytest.raises(ValueError, match="made for other weights"):
        profile_module.find_profile(stranger)
    with pytest.raises(ValueError, match="no shipped profile has model_type 'llama'"):
        profile_module.find_profile(tiny_model("llama", heads=4, kv_heads=2, layers=2))


def test_fingerprint_does_not_depend_on_dtype(model):
    as_bf16 = tiny_model("llama", heads=6, kv_heads=3, layers=3, dtype=torch.bfloat16)
    assert profile_module.fingerprints_match(
        profile_module.weight_fingerprint(model), profile_module.weight_fingerprint(as_bf16)
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(streaming_fraction=1.5), ValueError),
        (dict(sink_size=-1), ValueError),
        (dict(local_size=0), ValueError),
        (dict(local_size=2.5), TypeError),
        (dict(page_size=60, logical_page_size=16), ValueError),
        (dict(query_tile=0), ValueError),
    ],
)
def test_config_validation(kwargs, error):
    with pytest.raises(error):
        SparseConfig(**kwargs)


def test_config_overrides_profile(model):
    profile = Profile.from_scores(model, _scores(model), sink_size=8, local_size=32)
    settings = SparseConfig(local_size=64).resolve(profile)
    assert (settings.sink_size, settings.local_size, settings.page_size) == (8, 64, 64)
