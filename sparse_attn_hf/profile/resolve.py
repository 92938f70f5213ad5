"""Which profile a model gets: the one given (a Profile, a path, a shipped profile's name, a Hub repository),
else a shipped one that matches the model, else one calibrated on first use (``first_use``)."""

from __future__ import annotations

from pathlib import Path

from .format import Profile, _is_repo_id, find_profile, hub_profile, shipped_profile, weight_fingerprint


def resolve_profile(model, profile) -> Profile:
    """``profile`` may be None (a shipped one, else one calibrated on first use), ``"calibrate"``, a shipped
    profile's name, a path, or a Profile; the result fits ``model``."""
    if profile is None:
        try:
            return find_profile(model)
        except ValueError as error:
            if weight_fingerprint(model) is None:  # no weights to calibrate on (meta device)
                raise
            from .first_use import calibrated_profile

            return calibrated_profile(model, why=str(error).split(". Pass profile=")[0])
    if isinstance(profile, str) and profile == "calibrate":
        from .first_use import calibrated_profile

        return calibrated_profile(model, why="profile='calibrate'")
    if isinstance(profile, str) and not Path(profile).exists() and shipped_profile(profile) is not None:
        profile = shipped_profile(profile)  # a shipped profile's name: "Meta-Llama-3.1-8B-Instruct"
    elif isinstance(profile, str) and not Path(profile).exists() and _is_repo_id(profile):
        profile = hub_profile(profile)  # "org/name": a Hugging Face Hub repository holding HUB_FILE
    if isinstance(profile, (str, Path)):
        profile = Profile.load(profile)
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be None, a path or a Profile, got {type(profile).__name__}.")
    profile.validate_for(model)
    return profile
