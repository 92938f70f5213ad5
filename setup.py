from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sparse_attn_hf",
    version="0.1.0",
    description="Sparse attention (LServe + SampleAttention) for long-context inference with Hugging Face Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Shipped profiles live in profiles/ at the top of the repository; installed, they are the
    # data package sparse_attn_hf._profiles (see sparse_attn_hf/profile/format.py: shipped_profile_paths).
    packages=find_packages(include=["sparse_attn_hf", "sparse_attn_hf.*"]) + ["sparse_attn_hf._profiles"],
    package_dir={"sparse_attn_hf._profiles": "profiles"},
    package_data={"sparse_attn_hf._profiles": ["*.safetensors", "*.json", "LICENSE-*"],
                  "sparse_attn_hf.eval": ["data/*.txt", "data/*.md", "data/prose/*.txt", "data/prose/*.md"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "triton>=3.0; platform_system == 'Linux'",
        "gguf>=0.10",  # the default model ships as a GGUF file
        "numpy",
        "tqdm",  # progress bars of the profiler and the evaluation harness
    ],
    extras_require={
        # the notebook and evaluation-harness tests run examples/*.ipynb (nbclient + a python3 kernel)
        # and draw the harness's PNGs
        "test": ["pytest>=8", "matplotlib>=3.7", "nbclient>=0.10", "nbformat>=5.9", "ipykernel"],
        "examples": ["matplotlib>=3.7", "nbclient>=0.10", "nbformat>=5.9", "ipykernel"],
        "profile": ["matplotlib>=3.7"],  # the profiler's report PNG
    },
)
