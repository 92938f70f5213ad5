"""What differs between the supported Transformers releases (5.17 and newer), asked of the installed one.

Transformers 5.24 renamed the cache keyword of ``generate()`` and ``forward()`` from ``past_key_values`` to
``cache`` (the old name warns, and goes in 5.40), and generate's outputs carry ``.cache``. Code that runs on
both passes and reads the cache through these names:

    >>> from sparse_attn_hf.compat import CACHE_ARG, cache_of
    >>> logits = model(ids, **{CACHE_ARG: cache}).logits
    >>> out = model.generate(ids, return_dict_in_generate=True, max_new_tokens=8)
    >>> cache = cache_of(out)
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
RENAMED_CACHE = TRANSFORMERS_VERSION.release >= (5, 24)
CACHE_ARG = "cache" if RENAMED_CACHE else "past_key_values"  # the keyword this release takes
CACHE_KEYWORDS = ("cache", "past_key_values")  # every name a caller may use


def cache_of(output):
    """The cache a ``generate(..., return_dict_in_generate=True)`` output returned."""
    return output.cache if RENAMED_CACHE else output.past_key_values


__all__ = ["CACHE_ARG", "CACHE_KEYWORDS", "RENAMED_CACHE", "TRANSFORMERS_VERSION", "cache_of"]
