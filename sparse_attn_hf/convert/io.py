"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")


def read_checkpoint(src: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, all tensors) of a checkpoint folder; every ``*.safetensors`` file is read."""
    from safetensors.torch import load_file

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass the folder of a Hugging Face checkpoint.")
    config = json.loads((src / "config.json").read_text())
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in src.glob("*.bin"))
        hint = (f" It holds {', '.join(pickled[:3])}: pickle files, which this converter does not load (they can "
                "run code). Convert them to safetensors first, in an environment you trust "
                "(safetensors.torch.save_file(torch.load(f), ...)).") if pickled else ""
        raise FileNotFoundError(f"{src} has no *.safetensors weights.{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in two files of {src}.")
            tensors[name] = tensor
    return config, tensors


def write_checkpoint(dst: str | Path, config: dict, tensors: dict[str, torch.Tensor], *,
                     shard_bytes: int = 4 << 30) -> list[Path]:
    """Write config.json and the tensors (sharded above ``shard_bytes``, with an index file)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        paths = [dst / "model.safetensors"]
    else:
        paths = [dst / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: path.name for path, shard in zip(paths, shards) for name in shard}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for path, shard in zip(paths, shards):
        save_file(shard, str(path), metadata={"format": "pt"})
    return paths


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files that exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
