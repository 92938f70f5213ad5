import pytest
import torch


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the real default model, loaded once (about 30 s on 2 cores)."""
    from sparse_attn_hf.default_model import load_default_model

    torch.manual_seed(0)
    return load_default_model()
