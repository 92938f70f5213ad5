"""The six DuoAttention patterns shipped as profiles: matched by checkpoint name and configuration (their weights
are not available), never silently given to a same-shape model of another name; usable by name."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparse_attn_hf import Profile, patch_model, unpatch_model
from sparse_attn_hf.profile import resolve_profile, shipped_profile_paths
from sparse_attn_hf.profiler.published import PUBLISHED

pytestmark = pytest.mark.compat
ROOT = Path(__file__).resolve().parent.parent


def _meta_model(entry, name: str | None = None, **changes):
    """The published model's architecture with its configuration fields, on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config = entry.config()
    config.max_position_embeddings = entry.match.get("max_position_embeddings", 8192)
    rope = dict(entry.match.get("rope_parameters", {"rope_theta": 500000.0}))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    config.rope_parameters = rope
    for key, value in changes.items():
        setattr(config, key, value)
    config._name_or_path = entry.checkpoint if name is None else name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_every_published_pattern_ships_with_its_provenance():
    names = {path.name for path in shipped_profile_paths()}
    for entry in PUBLISHED:
        path = ROOT / "profiles" / f"{entry.folder.lower()}.safetensors"
        assert path.name in names
        profile = Profile.load(path)
        assert profile.checkpoint == entry.checkpoint and profile.fingerprint is None
        assert "mit-han-lab/duo-attention" in profile.provenance and "MIT License" in profile.provenance
        assert json.loads(profile.config_match) == entry.match
        gates = profile.head_score
        assert gates.shape == (32, entry.kv_heads) and gates.min() >= 0 and gates.max() <= 1
        assert 0 < int(profile.streaming_heads().sum()) < gates.numel()  # a real split at the shipped fraction
    assert (ROOT / "profiles" / "LICENSE-duo-attention").is_file()


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e.folder for e in PUBLISHED])
def test_a_published_model_gets_its_profile_by_name_and_configuration(entry, caplog):
    model = _meta_model(entry)
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        profile = resolve_profile(model, None)
    assert profile.model_name == entry.folder
    assert "weights were not verified" in caplog.text or entry.folder in caplog.text


def test_a_fine_tune_of_the_same_shape_does_not_get_it_silently():
    entry = PUBLISHED[0]  # Llama-3.1-8B-Instruct
    tuned = _meta_model(entry, name="someone/Llama-3.1-8B-Instruct-medical-sft")
    with pytest.raises(ValueError, match="profile='Meta-Llama-3.1-8B-Instruct'|profile=.Meta-Llama-3.1-8B-Instruct"):
        resolve_profile(tuned, None)
    unnamed = _meta_model(entry, name="")
    with pytest.raises(ValueError, match="not set"):
        resolve_profile(unnamed, None)
    # named explicitly, the shipped profile is the user's choice
    assert resolve_profile(tuned, "Meta-Llama-3.1-8B-Instruct").checkpoint == entry.checkpoint
    patch_model(tuned, "meta-llama/Llama-3.1-8B-Instruct")
    assert tuned._sparse_attn_state.profile.model_name == entry.folder
    unpatch_model(tuned)


def test_a_changed_configuration_does_not_match():
    entry = PUBLISHED[0]
    other_rope = dict(entry.match["rope_parameters"], factor=4.0)
    with pytest.raises(ValueError, match="rope_parameters"):
        resolve_profile(_meta_model(entry, rope_parameters=other_rope), None)
    v02, v03 = PUBLISHED[4], PUBLISHED[5]  # Mistral v0.2 and v0.3 differ in their vocabulary
    assert resolve_profile(_meta_model(v03), None).model_name == v03.folder
    with pytest.raises(ValueError, match="vocab_size"):
        resolve_profile(_meta_model(v02, name=v02.checkpoint, vocab_size=32768), None)


def test_a_profile_whose_metadata_was_edited(tmp_path):
    source = ROOT / "profiles" / "meta-llama-3.1-8b-instruct.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    broken = dict(metadata, config_match="{not json")
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=broken)
    with pytest.raises(ValueError, match="config_match"):
        Profile.load(tmp_path / "broken.safetensors")
    # edited to claim another vocabulary: the model no longer matches it, and the message says which field
    edited = dict(metadata, config_match=json.dumps(dict(json.loads(metadata["config_match"]), vocab_size=1)))
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=edited)
    from sparse_attn_hf.profile import config_mismatch

    assert "vocab_size" in config_mismatch(Profile.load(tmp_path / "edited.safetensors"), _meta_model(PUBLISHED[0]))


def _hub_cache(root: Path, repo_id: str, files: dict) -> Path:
    """A cache folder laid out as huggingface_hub lays it: refs/main names a snapshot holding ``files``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return root


def test_profiles_from_the_hub_offline(tmp_path, monkeypatch):
    """profile="org/name" reads the repository's profile through huggingface_hub: here from a cache laid out as it
    lays it, with HF_HUB_OFFLINE=1 (no test needs the network); a missing repository or file says so."""
    import huggingface_hub.constants as hub

    from helpers import tiny_model
    from sparse_attn_hf.profile import HUB_FILE

    model = tiny_model("llama", heads=4, kv_heads=2, layers=2)
    made = Profile.from_scores(model, torch.tensor([[0.1, 0.9], [0.8, 0.2]]), model_name="tiny", checkpoint="me/tiny")
    made.save_pretrained(tmp_path / "repo", fidelity="0 of 12 passkeys lost at 2K")
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "me/tiny" in card and "0 of 12 passkeys lost" in card and "library_name: sparse_attn_hf" in card
    cache = _hub_cache(tmp_path / "hub", "me/tiny-profile", {HUB_FILE: tmp_path / "repo" / HUB_FILE})
    _hub_cache(tmp_path / "hub", "me/empty", {"README.md": tmp_path / "repo" / "README.md"})
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    patch_model(model, "me/tiny-profile")
    assert torch.equal(model._sparse_attn_state.streaming, made.streaming_heads())
    unpatch_model(model)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache|no such repository"):
        patch_model(model, "me/nowhere")
    with pytest.raises(ValueError, match=f"{HUB_FILE}|not in the local"):
        patch_model(model, "me/empty")
    assert not hasattr(model, "_sparse_attn_state")
