"""python -m sparse_attn_hf.convert {chatglm,internlm2} SRC DST [options]: convert, then print a summary."""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn_hf.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="family", required=True)
    glm = sub.add_parser("chatglm", help="ChatGLM2/ChatGLM3/original GLM-4 -> GlmForCausalLM")
    glm.add_argument("src")
    glm.add_argument("dst")
    glm.add_argument("--rope-ratio", choices=["base", "positions"], default=None,
                     help="how the checkpoint's code applies rope_ratio: 'base' multiplies the rotary base "
                          "(ChatGLM3, GLM-4), 'positions' divides positions (ChatGLM2-6B-32K); read from the "
                          "checkpoint's modeling file when present, else required when rope_ratio != 1")
    internlm = sub.add_parser("internlm2", help="InternLM2/InternLM2.5 -> LlamaForCausalLM")
    internlm.add_argument("src")
    internlm.add_argument("dst")
    args = parser.parse_args(argv)
    if args.family == "chatglm":
        from .chatglm import convert_chatglm

        summary = convert_chatglm(args.src, args.dst, rope_ratio_mode=args.rope_ratio)
    else:
        from .internlm2 import convert_internlm2

        summary = convert_internlm2(args.src, args.dst)
    print(summary)


if __name__ == "__main__":
    main()
