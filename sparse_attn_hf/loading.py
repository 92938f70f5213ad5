"""Loading a model for the command-line tools: ``default`` (the embedded SmolLM2-135M-Instruct), a local
Hugging Face checkpoint folder or a ``.gguf`` file. Never downloads."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(spec: str, device: str = "cpu", dtype: str | torch.dtype = "auto", tokenizer: bool = True):
    """(model, tokenizer, name) of ``spec``: "default" (the embedded SmolLM2-135M-Instruct), a local Hugging
    Face checkpoint folder (config.json, weights and tokenizer) or a .gguf file. Never downloads. With
    ``tokenizer=False`` none is loaded (None is returned in its place): a folder without one loads too."""
    torch_dtype = resolve_dtype(dtype, device)
    if spec == "default":
        from .default_model import NAME, load_default_model

        model, tokenizer = load_default_model(dtype=torch_dtype, device=device)
        return model, tokenizer, NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec!r}: the folder has no config.json; pass a Hugging Face checkpoint "
                             "folder (save_pretrained), a .gguf file or 'default'.")
        kwargs = {"pretrained_model_name_or_path": str(path)}
    elif path.is_file() and path.suffix.lower() == ".gguf":
        kwargs = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    elif path.is_file():
        raise ValueError(f"--model {spec!r} is a file but not a .gguf file; pass a checkpoint folder, a .gguf "
                         "file or 'default'.")
    else:
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder; pass 'default', a local Hugging Face "
                                "checkpoint folder (with config.json) or a .gguf file (models are not downloaded).")
    if tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(**kwargs, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model {spec!r}: no usable tokenizer next to the weights ({error}).") from None
    else:
        tokenizer = None
    model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer, path.stem if path.is_file() else path.resolve().name


def load_config(spec: str):
    """The config of ``spec`` (as for :func:`load_model`) without loading weights."""
    from transformers import AutoConfig

    from .default_model import default_model_file

    path = default_model_file() if spec == "default" else Path(spec)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    raise FileNotFoundError(f"--model {spec!r} is not 'default', a checkpoint folder with config.json or a .gguf "
                            "file (models are not downloaded).")
