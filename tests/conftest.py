import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory, monkeypatch):
    """Profiles calibrated on first use go to a folder of the test session, not the user's cache."""
    monkeypatch.setenv("SPARSE_ATTN_HF_CACHE", str(tmp_path_factory.getbasetemp() / "sparse_attn_hf_cache"))


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the real default model, loaded once (about 30 s on 2 cores)."""
    from sparse_attn_hf.default_model import load_default_model

    torch.manual_seed(0)
    return load_default_model()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compat: the fast subset that CI also runs on the oldest supported Transformers release (.ci/run)")
