"""The seam between the plugin and its kernels: checks inputs, then picks an implementation.

On CUDA with float16/bfloat16 the Triton kernel runs; everywhere else the PyTorch reference (with one
logged reason). Both follow the contract of ``kernels/reference.py``. ``dispatch`` decides which runs, ``prefill``
and ``dense`` hold the prefill ops, ``decode`` the decode step's, ``varlen`` packed requests' attention,
``custom_ops`` registers the decode ops for torch.compile.
"""

from . import custom_ops  # noqa: F401 - registers the decode ops with torch.library
from .decode import append_token, compile_top_pages, paged_decode, physical_page_scores, shortlist_pages, top_pages
from ..kernels.fp8 import check_device as check_fp8_device
from ..kernels.layout import LogitTerms, Visibility
from .dense import dense_attention, split_causal_attention
from .dispatch import KERNEL_DTYPES, KERNEL_MAX_HEAD_DIM, SUPPORTED_DTYPES, check_dtype, decode_on_host, set_backend
from .prefill import read_fp8_pages, sampled_column_scores, sparse_attention, stripe_attention
from .varlen import block_table_decode, varlen_attention, varlen_available

__all__ = [
    "KERNEL_DTYPES", "KERNEL_MAX_HEAD_DIM", "LogitTerms", "SUPPORTED_DTYPES", "Visibility", "append_token",
    "block_table_decode",
    "check_dtype", "check_fp8_device", "compile_top_pages",
    "decode_on_host", "dense_attention", "paged_decode", "physical_page_scores", "read_fp8_pages", "sampled_column_scores",
    "set_backend", "shortlist_pages", "sparse_attention", "split_causal_attention", "stripe_attention", "top_pages",
    "varlen_attention", "varlen_available",
]
