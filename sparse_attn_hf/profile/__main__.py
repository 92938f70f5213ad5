"""``python -m sparse_attn_hf.profile``: make, import and report profiles (see sparse_attn_hf.profiler.cli)."""

from ..profiler.cli import main

main()
