"""sparse_attn_hf: sparse attention for long-context inference with Hugging Face Transformers.

    >>> from sparse_attn_hf import patch_model
    >>> patch_model(model)                  # the shipped profile for this model, or profile=PATH
    >>> out = model.generate(**inputs)      # as usual
"""

from .api import patch_model, patched, unpatch_model
from .cache import SparseCache
from .config import SparseConfig
from .profile import Profile
from .record import last_call

__all__ = ["patch_model", "unpatch_model", "patched", "last_call", "SparseConfig", "Profile", "SparseCache"]
__version__ = "0.1.0"
