"""The six head patterns DuoAttention's authors published, as shipped profiles.

    python -m sparse_attn_hf.profiler.published PATTERNS_DIR OUT_DIR

``PATTERNS_DIR`` holds the folders of mit-han-lab/duo-attention's ``attn_patterns/`` (one per model, each with
``full_attention_heads.tsv`` and ``config.json``); one profile per model is written to ``OUT_DIR``. The models'
weights are not needed (nor available here): each profile records the checkpoint it was trained for and the
configuration fields that identify it (``config_match``), and ``find_profile`` gives it to a model of that name and
configuration only, saying that its weights were not verified.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE = "mit-han-lab/duo-attention"
SOURCE_COMMIT = "fe93c314ae87306ef6629dc16713250b4718ffe7"
LICENSE = "MIT"


@dataclass(frozen=True)
class Published:
    folder: str  # the pattern folder's name
    checkpoint: str  # the Hugging Face id of the model it was trained for
    model_type: str
    kv_heads: int
    match: dict  # config fields a model must have (besides shapes and name): vocabulary, positions, RoPE

    def config(self):
        """The model's configuration as far as a profile needs it (shapes, layer types)."""
        from transformers import LlamaConfig, MistralConfig

        common = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=self.kv_heads, hidden_size=4096,
                      head_dim=128, intermediate_size=14336 if self.kv_heads == 8 else 11008,
                      vocab_size=self.match["vocab_size"])
        if self.model_type == "mistral":
            return MistralConfig(**common, sliding_window=None)
        return LlamaConfig(**common)


LLAMA3_1_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PUBLISHED = (
    Published("Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama", 8,
              {"vocab_size": 128256, "max_position_embeddings": 131072, "rope_parameters": LLAMA3_1_ROPE}),
    Published("Llama-3-8B-Instruct-Gradient-1048k", "gradientai/Llama-3-8B-Instruct-Gradient-1048k", "llama", 8,
              {"vocab_size": 128256}),  # its RoPE theta and positions: not recorded here, the name decides
    Published("Llama-3-8B-Instruct-Gradient-4194k", "gradientai/Llama-3-8B-Instruct-Gradient-4194k", "llama", 8,
              {"vocab_size": 128256}),
    Published("Llama-2-7B-32K-Instruct", "togethercomputer/Llama-2-7B-32K-Instruct", "llama", 32,
              {"vocab_size": 32000, "max_position_embeddings": 32768,
               "rope_parameters": {"rope_type": "linear", "factor": 8.0}}),
    Published("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "mistral", 8,
              {"vocab_size": 32000, "max_position_embeddings": 32768, "rope_parameters": {"rope_theta": 1000000.0}}),
    Published("Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "mistral", 8,
              {"vocab_size": 32768, "max_position_embeddings": 32768, "rope_parameters": {"rope_theta": 1000000.0}}),
)


def published_profile(patterns: Path, entry: Published):
    """The profile of one published pattern (``patterns``: the folder of all six)."""
    from .duo_import import import_duo

    return import_duo(
        patterns / entry.folder, entry.config(), model_name=entry.folder, checkpoint=entry.checkpoint,
        provenance=(f"DuoAttention head gates published in {SOURCE} (attn_patterns/{entry.folder}, commit "
                    f"{SOURCE_COMMIT}), {LICENSE} License; imported by sparse_attn_hf.profiler.published without "
                    "the model's weights"),
        config_match=json.dumps(entry.match, sort_keys=True),
    )


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    patterns, out = Path(argv[0]), Path(argv[1])
    for entry in PUBLISHED:
        path = published_profile(patterns, entry).save(out / f"{entry.folder.lower()}.safetensors")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
