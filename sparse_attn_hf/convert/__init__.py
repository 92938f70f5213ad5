"""Checkpoint converters for families whose original checkpoints ship remote code that no longer runs
on Transformers 5.x: ChatGLM2/3 and original GLM-4 -> ``GlmForCausalLM``, InternLM2/2.5 ->
``LlamaForCausalLM``. Safetensors in and out. Command line: ``python -m sparse_attn_hf.convert``.
"""
