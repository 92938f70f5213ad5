"""Profiles: per-(layer, KV head) scores and per-model defaults, stored as safetensors (``format``); which
profile a model gets (``resolve``: given, shipped, or calibrated on first use by ``first_use``).

A profile file holds the tensor ``head_score`` (float32 [covered layers, num_kv_heads], in [0, 1]: how
much a head needs the full context), optionally ``fingerprint`` (float32 [n], a summary of the model's
weights that identifies the model a shipped profile was made for), and a string metadata map. Profiles are made
by ``python -m sparse_attn_hf.profile`` (see :mod:`sparse_attn_hf.profiler`).
"""

from .format import (FORMAT_VERSION, HUB_FILE, UNLIMITED_BUDGET, Profile, _today, config_mismatch, covered_layers,
                     covered_rows, find_profile, fingerprints_match, hub_profile, model_shape, shipped_profile,
                     shipped_profile_paths, weight_fingerprint)
from .resolve import resolve_profile

__all__ = ["FORMAT_VERSION", "HUB_FILE", "UNLIMITED_BUDGET", "Profile", "config_mismatch", "covered_layers",
           "covered_rows", "find_profile", "fingerprints_match", "hub_profile", "model_shape", "resolve_profile",
           "shipped_profile", "shipped_profile_paths", "weight_fingerprint", "_today"]
