"""Profiles: per-(layer, KV head) scores and per-model defaults, stored as safetensors.

A profile file holds the tensor ``head_score`` (float32 [covered layers, num_kv_heads], in [0, 1]: how
much a head needs the full context), optionally ``fingerprint`` (float32 [n], a summary of the model's
weights that identifies the model a shipped profile was made for), and a string metadata map whose
keys are listed in ``_FIELDS``. A profile covers exactly the layers it may change: the model's
full-attention layers (``layers``, a JSON list; every layer of a model without native sliding-window
layers, whose windows stay as the model has them). Format 1 files (before ``layers``) cover every layer
and still load. Loading checks every field; ``validate_for(model)`` checks the profile
against a model and names the mismatch and the fix.

Profiles are made by ``python -m sparse_attn_hf.profile`` (see :mod:`sparse_attn_hf.profiler`).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

UNLIMITED_BUDGET = 1 << 40  # token_budget under which every context fits: exact dense decoding, no page selection

FORMAT_VERSION = 2  # 2: the covered layers (``layers``); 1 still loads (every layer covered)
_READS = ("1", "2")

# metadata key -> (type, default or _REQUIRED)
_REQUIRED = object()
_FIELDS: dict[str, tuple[type, object]] = {
    "model_type": (str, _REQUIRED),
    "model_name": (str, ""),
    "num_layers": (int, _REQUIRED),
    "num_heads": (int, _REQUIRED),
    "num_kv_heads": (int, _REQUIRED),
    "head_dim": (int, _REQUIRED),
    "streaming_fraction": (float, 0.5),
    "sink_size": (int, 128),
    "local_size": (int, 4096),
    "page_size": (int, 64),
    "logical_page_size": (int, 16),
    "token_budget": (int, 4096),
    "reuse_interval": (int, 4),
    "decode_local_size": (int, 256),
    "alpha": (float, 0.95),
    "rw": (float, 0.08),
    "r_row": (float, 0.025),
    "dense_below": (int, 16384),
    "method": (str, ""),
    "calibration": (str, ""),
    "created": (str, ""),
    "command": (str, ""),
    "sweep": (str, ""),  # JSON: the SampleAttention sweep's table (sparse_attn_hf.profiler.sweep)
    "fraction_choice": (str, ""),  # JSON: the held-out fraction table and choice (sparse_attn_hf.profiler.held_out)
    "layers": (list, None),  # JSON list: the covered layers (format 2); absent: every layer
    "checkpoint": (str, ""),  # the Hugging Face id of the checkpoint the scores were made for
    "provenance": (str, ""),  # where the scores come from (source, commit, licence) for imported ones
    "config_match": (str, ""),  # JSON: config fields a model must have to get this profile without its weights
}

_HOW_TO_GET_ONE = (
    "pass profile=Profile.all_dense(model) to run every head dense, or "
    "Profile.from_scores(model, scores) with your own per-(layer, KV head) scores"
)


@dataclass
class Profile:
    """Per-head scores plus the model identity and default settings they were made for.

    ``head_score`` has one row per covered layer (``layers``, ascending; ``None`` = every layer): a hybrid
    model's full-attention layers. ``streaming_heads`` answers for every layer of the model.

    Example:
        >>> profile = Profile.load("profiles/smollm2-135m-instruct.safetensors")
        >>> profile.streaming_heads()          # bool [num_layers, num_kv_heads]
    """

    head_score: torch.Tensor
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_name: str = ""
    streaming_fraction: float = 0.5
    sink_size: int = 128
    local_size: int = 4096
    page_size: int = 64
    logical_page_size: int = 16
    token_budget: int = 4096
    reuse_interval: int = 4
    decode_local_size: int = 256
    alpha: float = 0.95
    rw: float = 0.08
    r_row: float = 0.025
    dense_below: int = 16384
    method: str = ""
    calibration: str = ""
    created: str = ""
    command: str = ""
    sweep: str = field(default="", repr=False)
    fraction_choice: str = field(default="", repr=False)
    layers: tuple[int, ...] | None = None
    checkpoint: str = ""
    provenance: str = field(default="", repr=False)
    config_match: str = field(default="", repr=False)
    fingerprint: torch.Tensor | None = field(default=None, repr=False)
    source: Path | None = field(default=None, repr=False, compare=False)  # the file it was loaded from

    def __post_init__(self) -> None:
        self.head_score = torch.as_tensor(self.head_score, dtype=torch.float32).detach().cpu()
        layers = tuple(range(self.num_layers)) if self.layers is None else tuple(int(i) for i in self.layers)
        if list(layers) != sorted(set(layers)) or any(not 0 <= i < self.num_layers for i in layers) or not layers:
            raise ValueError(f"profile layers {list(layers)} must be ascending, distinct, at least one, and within the "
                             f"model's {self.num_layers} layers.")
        self.layers = layers
        expected = (len(layers), self.num_kv_heads)
        if tuple(self.head_score.shape) != expected:
            raise ValueError(
                f"profile head_score has shape {tuple(self.head_score.shape)}, expected "
                f"[covered layers, num_kv_heads] = {list(expected)}."
            )
        if not torch.isfinite(self.head_score).all():
            raise ValueError("profile head_score holds NaN or infinite values; re-create the profile.")
        if ((self.head_score < 0) | (self.head_score > 1)).any():
            raise ValueError("profile head_score values must lie in [0, 1]; re-create the profile.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        if not 0.0 <= self.streaming_fraction <= 1.0:
            raise ValueError(f"profile streaming_fraction={self.streaming_fraction} is outside [0, 1].")
        if self.page_size % self.logical_page_size:
            raise ValueError(
                f"profile page_size={self.page_size} is not a multiple of logical_page_size={self.logical_page_size}."
            )
        if self.token_budget != UNLIMITED_BUDGET and (self.token_budget % self.page_size
                                                      or self.token_budget < 2 * self.page_size):
            raise ValueError(
                f"profile token_budget={self.token_budget} must be a multiple of page_size={self.page_size} and at "
                "least two pages."
            )
        if not (0.0 < self.alpha <= 1.0 and 0.0 < self.rw < 1.0 and 0.0 < self.r_row < 1.0 and self.dense_below >= 0):
            raise ValueError(
                f"profile SampleAttention settings alpha={self.alpha} (in (0, 1]), rw={self.rw} and r_row={self.r_row} "
                f"(in (0, 1)), dense_below={self.dense_below} (>= 0) are out of range; re-create the profile."
            )
        if self.reuse_interval < 1 or self.decode_local_size < 1:
            raise ValueError(
                f"profile reuse_interval={self.reuse_interval} and decode_local_size={self.decode_local_size} "
                "must be >= 1."
            )
        if self.fingerprint is not None:
            self.fingerprint = torch.as_tensor(self.fingerprint, dtype=torch.float32).detach().cpu()
        if self.config_match:
            try:
                match = json.loads(self.config_match)
            except json.JSONDecodeError:
                match = None
            if not isinstance(match, dict):
                raise ValueError(f"profile config_match={self.config_match[:80]!r} is not a JSON object of config "
                                 "fields; re-create the profile (sparse_attn_hf.profiler.published).")

    # ----------------------------------------------------------------- labels
    def streaming_heads(self, streaming_fraction: float | None = None) -> torch.Tensor:
        """Bool [num_layers, num_kv_heads]: True for streaming heads (always False on layers not covered).

        Of the covered heads, the ``floor(fraction * n + 0.5)`` (halves round up, so 0.25 of 90 heads is 23)
        with the lowest scores stream; equal scores are ordered by (layer, head), so the split never changes
        from run to run.
        """
        fraction = self.streaming_fraction if streaming_fraction is None else streaming_fraction
        flat = self.head_score.flatten()
        n_stream = math.floor(fraction * flat.numel() + 0.5)
        order = torch.sort(flat, stable=True).indices  # stable: ties keep (layer, head) order
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:n_stream]] = True
        labels = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.bool)
        labels[list(self.layers)] = chosen.view_as(self.head_score)
        return labels

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_scores(cls, model, scores, **settings) -> "Profile":
        """A profile for ``model`` from scores [num_layers or covered layers, num_kv_heads] (the rows of a
        hybrid model's window layers, if given, are dropped); ``settings`` set other fields."""
        shape = model_shape(model)
        layers = covered_layers(model)
        scores = covered_rows(torch.as_tensor(scores, dtype=torch.float32), shape["num_layers"], layers)
        settings.setdefault("method", "user scores")
        settings.setdefault("created", _today())
        return cls(head_score=scores, fingerprint=weight_fingerprint(model), layers=layers, **shape, **settings)

    @classmethod
    def all_dense(cls, model, **settings) -> "Profile":
        """The explicit opt-in for no sparsity at all: every head dense (streaming_fraction 0), no SampleAttention
        (alpha 1) and no page selection (``config.UNLIMITED_BUDGET``): exact dense attention at every length, in
        prefill and decode. ``settings`` override any of these."""
        shape = model_shape(model)
        settings.setdefault("method", "all dense")
        settings.setdefault("streaming_fraction", 0.0)
        settings.setdefault("alpha", 1.0)
        settings.setdefault("token_budget", UNLIMITED_BUDGET)
        scores = torch.ones(len(covered_layers(model)), shape["num_kv_heads"])
        return cls.from_scores(model, scores, **settings)

    # --------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"head_score": self.head_score.contiguous()}
        if self.fingerprint is not None:
            tensors["fingerprint"] = self.fingerprint.contiguous()
        metadata = {"format_version": str(FORMAT_VERSION)}
        metadata.update({key: str(getattr(self, key)) for key in _FIELDS if key != "layers"})
        metadata["layers"] = json.dumps(list(self.layers))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    def save_pretrained(self, folder: str | Path, fidelity: str = "") -> Path:
        """Write ``folder`` as a Hugging Face Hub profile repository expects it: the profile (``HUB_FILE``) and a
        model card stub naming the model, the method and (``fidelity``, free text) what it was measured to keep.
        Upload the folder (``hf upload ORG/NAME FOLDER``); ``patch_model(model, profile="ORG/NAME")`` reads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = self.save(folder / HUB_FILE)
        labels = self.streaming_heads()
        card = [
            "---", "library_name: sparse_attn_hf", "tags:", "- sparse-attention", "- long-context",
            *([f"base_model: {self.checkpoint}"] if "/" in self.checkpoint else []), "---", "",
            f"# sparse_attn_hf profile for {self.model_name or self.checkpoint or self.model_type}", "",
            f"Head labels for [sparse_attn_hf](https://pypi.org/project/sparse_attn_hf/): {int(labels.sum())} of "
            f"{labels.numel()} (layer, KV head) pairs stream at fraction {self.streaming_fraction} (sink "
            f"{self.sink_size}, local {self.local_size}, decode window {self.decode_local_size}).", "",
            "```python", "from sparse_attn_hf import patch_model",
            "patch_model(model, profile=\"ORG/NAME\")  # this repository", "```", "",
            f"- model: {self.checkpoint or self.model_name} ({self.model_type}, {self.num_layers} layers, "
            f"{self.num_kv_heads} KV heads)",
            f"- method: {self.method or 'unknown'}",
            f"- calibration data: {self.calibration or 'unknown'}",
            f"- made: {self.created or 'unknown'}",
            *([f"- provenance: {self.provenance}"] if self.provenance else []),
            f"- fidelity: {fidelity or 'not measured'}", "",
        ]
        (folder / "README.md").write_text("\n".join(card), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Load and check a profile file; every problem raises ``ValueError`` naming the file."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"profile file {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors profile ({error}); the file may be truncated or of "
                "another format. Re-create it or copy it again."
            ) from None
        try:
            profile = cls._from_parts(tensors, metadata)
        except (ValueError, TypeError) as error:
            raise ValueError(f"invalid profile {path}: {error}") from None
        profile.source = path
        return profile

    @classmethod
    def _from_parts(cls, tensors: dict, metadata: dict) -> "Profile":
        version = metadata.get("format_version")
        if version is None:
            raise ValueError("metadata has no 'format_version'; this is not a sparse_attn_hf profile.")
        if version not in _READS:
            raise ValueError(f"format_version {version} is not supported (this version reads {', '.join(_READS)}).")
        if "head_score" not in tensors:
            raise ValueError("the tensor 'head_score' is missing.")
        values = {}
        for key, (kind, default) in _FIELDS.items():
            if key not in metadata:
                if default is _REQUIRED:
                    raise ValueError(f"metadata key {key!r} is missing.")
                continue
            try:
                values[key] = _parse(kind, metadata[key])
            except ValueError:
                raise ValueError(f"metadata {key}={metadata[key]!r} is not a valid {kind.__name__}.") from None
        return cls(head_score=tensors["head_score"], fingerprint=tensors.get("fingerprint"), **values)

    # --------------------------------------------------------------- checking
    def validate_for(self, model) -> None:
        """Raise ``ValueError`` naming each way this profile does not fit ``model``."""
        shape = model_shape(model)
        problems = [
            f"{key}: profile {getattr(self, key)!r}, model {value!r}"
            for key, value in shape.items()
            if getattr(self, key) != value
        ]
        if not problems and self.layers != covered_layers(model):
            problems.append(f"covered layers: profile {list(self.layers)}, the model's full-attention layers "
                            f"{list(covered_layers(model))}")
        if not problems and self.fingerprint is not None:
            model_print = weight_fingerprint(model)
            if model_print is not None and not fingerprints_match(self.fingerprint, model_print):
                problems.append(
                    "weights: the profile was made for other weights of the same shape "
                    f"({self.model_name or 'unnamed model'})"
                )
        if problems:
            raise ValueError(
                f"profile for {self.model_name or self.model_type!r} does not fit this model: "
                + "; ".join(problems)
                + ". Use a profile made for this model, or "
                + _HOW_TO_GET_ONE
                + ". To use a profile on a fine-tune of its model on purpose, drop its weight check with "
                "dataclasses.replace(profile, fingerprint=None)."
            )

    def describe(self) -> str:
        labels = self.streaming_heads()
        covers = "" if len(self.layers) == self.num_layers else f" (covers the full-attention layers {list(self.layers)})"
        return (
            f"Profile({self.model_name or self.model_type}: {self.num_layers} layers{covers} x {self.num_kv_heads} KV heads, "
            f"{int(labels.sum())} streaming at fraction {self.streaming_fraction}, sink {self.sink_size}, "
            f"local {self.local_size}, method {self.method!r})"
        )


# --------------------------------------------------------------------- helpers
def _parse(kind: type, text: str):
    if kind is list:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(text) from None
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ValueError(text)
        return tuple(value)
    if kind is int:
        return int(text)
    if kind is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    return text


def _today() -> str:
    return datetime.date.today().isoformat()


def model_shape(model) -> dict:
    """The identity fields a profile is checked against: model_type and attention shapes.

    ``model``: a model, or its config (for a profile made without loading weights)."""
    config = getattr(model, "config", model).get_text_config(decoder=True)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": head_dim,
    }


def covered_layers(model) -> tuple[int, ...]:
    """The layers a profile for ``model`` (a model or its config) covers: those without a native window
    (``ValueError`` where every layer slides)."""
    from ..models import full_attention_layers

    return full_attention_layers(getattr(model, "config", model))


def covered_rows(scores: torch.Tensor, num_layers: int, layers: tuple[int, ...]) -> torch.Tensor:
    """Per-layer scores [num_layers, H] -> the rows of the covered ``layers`` (a hybrid model's window layers
    dropped); anything else is returned as it is, for the shape check to judge."""
    if scores.ndim == 2 and scores.shape[0] == num_layers != len(layers):
        return scores[list(layers)]
    return scores


_CHUNKS = 8


def weight_fingerprint(model) -> torch.Tensor | None:
    """A dtype-robust summary of the weights: mean |w| of 8 row chunks of three matrices.

    The matrices are the input embedding and the first 2-D parameter of the first and the last
    attention module. ``None`` when weights are not materialized (meta device). On a tensor-parallel
    model it is collective (every rank computes it, as every rank patches).
    """
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    matrices = [model.get_input_embeddings().weight]
    for module in attention[:1] + attention[-1:]:
        matrices += [p for p in module.parameters() if p.ndim == 2][:1]
    parts = []
    for weight in matrices:
        if weight.device.type == "meta":
            return None
        rows = weight.detach().float().abs().reshape(weight.shape[0], -1).mean(dim=1)
        chunks = torch.stack([chunk.mean() for chunk in rows.chunk(_CHUNKS)])
        if hasattr(chunks, "full_tensor"):  # DTensor weights (tensor parallelism): gather the 8 numbers
            chunks = chunks.full_tensor()
        parts.append(chunks.cpu())  # matrices may sit on different devices (device_map)
    return torch.cat(parts)


def fingerprints_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-2, atol=1e-6)


def shipped_profile_paths() -> list[Path]:
    """Profiles shipped with the package: profiles/ of a source checkout, or the installed copy."""
    candidates = [Path(__file__).resolve().parents[2] / "profiles"]
    try:
        candidates.append(Path(str(resources.files("sparse_attn_hf._profiles"))))
    except (ModuleNotFoundError, TypeError):
        pass
    paths: dict[str, Path] = {}
    for folder in candidates:
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                paths.setdefault(path.name, path)
    return list(paths.values())


def find_profile(model) -> Profile:
    """The shipped profile made for ``model``, or a clear error. A profile with a weight fingerprint matches a
    model of the same shapes and weights; one without (DuoAttention's published gates, imported without their
    weights) matches a model of the same shapes whose checkpoint name is the profile's and whose configuration
    has every field the profile records (``config_match``): a fine-tune of the same shape under another name does
    not get it, and the message names it for an explicit ``profile=NAME``."""
    shape = model_shape(model)
    same_shape = [p for p in (Profile.load(path) for path in shipped_profile_paths())
                  if all(getattr(p, key) == value for key, value in shape.items())]
    model_print = weight_fingerprint(model) if same_shape else None
    for profile in same_shape:
        if profile.fingerprint is not None and model_print is not None:
            if fingerprints_match(profile.fingerprint, model_print):
                return profile
    unverified = [p for p in same_shape if p.fingerprint is None]
    reasons = {p.model_name: config_mismatch(p, model) for p in unverified}
    for profile in unverified:
        if reasons[profile.model_name] is None:
            from .._log import warn_once

            warn_once(f"sparse_attn_hf: using the shipped profile {profile.model_name!r} ({profile.method}) for "
                      f"{profile.checkpoint}: chosen by the model's name and configuration; its weights were not "
                      "verified (the profile was made without them).")
            return profile
    if same_shape:
        parts = []
        weighed = [p.model_name for p in same_shape if p.fingerprint is not None]
        if weighed:
            parts.append(f"shipped profiles of the same shape were made for other weights: {weighed}")
        if unverified:
            why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            parts.append(f"shipped profiles of the same shape were made for other checkpoints ({why})")
        detail = "; ".join(parts)
        alike = sorted((p for p in unverified if config_mismatch(p, model, name=False) is None),
                       key=lambda p: -len(json.loads(p.config_match or "{}")))  # the most specific first
        alike = [p.model_name for p in alike]
        if alike:  # the configuration is that of a published model, the name is not: a fine-tune, or a copy
            detail += (f"; this model's configuration is that of {alike[0]}: if it is that model (or a fine-tune you "
                       f"trust with its head labels), pass profile={alike[0]!r}")
    else:
        detail = f"no shipped profile has model_type {shape['model_type']!r} with these shapes {shape}"
    raise ValueError(
        f"no shipped profile matches this model ({detail}). Pass profile=PATH to a profile made for it, or "
        + _HOW_TO_GET_ONE
        + "."
    )


def config_mismatch(profile: Profile, model, name: bool = True) -> str | None:
    """Why a profile without a weight fingerprint does not match ``model`` by its checkpoint name (unless ``name``
    is False) and configuration, or None."""
    config = getattr(model, "config", model).get_text_config(decoder=True)
    given = str(getattr(config, "_name_or_path", "") or getattr(getattr(model, "config", model), "_name_or_path", ""))
    wanted = {profile.checkpoint.rstrip("/").split("/")[-1].lower(), profile.model_name.lower()} - {""}
    if name and not given:
        return "the model's checkpoint name is not set (config._name_or_path)"
    if name and given.rstrip("/").split("/")[-1].lower() not in wanted:
        return f"checkpoint {given!r}, not {profile.checkpoint or profile.model_name!r}"
    expected = json.loads(profile.config_match) if profile.config_match else {}
    for key, value in expected.items():
        have = getattr(config, key, None)
        if key == "rope_parameters" and have is None:  # the name before Transformers 5
            have = getattr(config, "rope_scaling", None)
        if not _same_value(have, value):
            return f"config {key} {have!r}, the profile's checkpoint has {value!r}"
    return None


def _same_value(have, want) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_same_value(have.get(k), v) for k, v in want.items())
    if isinstance(want, float) or isinstance(have, float):
        return have is not None and math.isclose(float(have), float(want), rel_tol=1e-6)
    return have == want


HUB_FILE = "sparse_attn_profile.safetensors"  # the file a profile repository on the Hugging Face Hub holds


def _is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith(".safetensors")


def hub_profile(repo_id: str, revision: str | None = None) -> Path:
    """The local path of the profile of Hub repository ``repo_id`` (its ``HUB_FILE``), downloaded by
    ``huggingface_hub`` into its cache, or read from there (``HF_HUB_OFFLINE=1``); a clear error where the repository
    or the file does not exist or cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, HUB_FILE, revision=revision))
    except LocalEntryNotFoundError:  # before EntryNotFoundError: huggingface_hub derives it from that one
        raise ValueError(f"profile={repo_id!r}: not in the local Hugging Face cache and the Hub cannot be reached "
                         "(offline: HF_HUB_OFFLINE=1, or no network); download it once online, or pass a file path."
                         ) from None
    except RepositoryNotFoundError:
        raise ValueError(f"profile={repo_id!r}: no such repository on the Hugging Face Hub (or it is private: log in "
                         "with `hf auth login`).") from None
    except EntryNotFoundError:
        raise ValueError(f"profile={repo_id!r}: the repository has no {HUB_FILE}; a profile repository holds one "
                         "(Profile.save_pretrained writes it).") from None


def shipped_profile(name: str) -> Path | None:
    """The shipped profile file of ``name`` (its file name, file stem, model name or checkpoint id), or None."""
    wanted = name.lower()
    for path in shipped_profile_paths():
        profile = Profile.load(path)
        names = {path.name.lower(), path.stem.lower(), profile.model_name.lower(), profile.checkpoint.lower()}
        if wanted in names:
            return path
    return None
