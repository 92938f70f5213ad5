"""python -m sparse_attn_hf.eval needle|passkey|ppl --model M [options]: see ``--help`` and eval/cli.py."""

from .cli import main

if __name__ == "__main__":
    main()
