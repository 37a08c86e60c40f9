"""Installs the folders cheers/ tokenizer/ flow_head/ train/ eval/ lcqat/ configs/ as one ``cheers`` namespace."""

from setuptools import setup

SUBPACKAGES = ["tokenizer", "flow_head", "train", "eval", "lcqat", "configs"]


def _find(folder: str, dotted: str) -> tuple[list[str], dict[str, str]]:
    import os

    packages, dirs = [], {}
    for root, _, files in os.walk(folder):
        if "__init__.py" not in files or "__pycache__" in root:
            continue
        rel = os.path.relpath(root, folder)
        name = dotted if rel == "." else dotted + "." + rel.replace(os.sep, ".")
        packages.append(name)
        dirs[name] = root
    return packages, dirs


packages, package_dir = _find("cheers", "cheers")
for sub in SUBPACKAGES:
    p, d = _find(sub, f"cheers.{sub}")
    packages += p
    package_dir.update(d)

setup(
    name="cheers",
    version="0.1.0",
    description="Unified multimodal model (understanding + flow-matching generation) with 2-bit LC-QAT",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"cheers": ["assets/*", "assets/**/*"], "cheers.eval": ["data/*"], "cheers.serve": ["static/*"],
                  "cheers.configs": ["*.yaml"]},
    include_package_data=True,
    install_requires=[
        # this machine's local wheels; pip's cap here is torch<=2.14.1, torchvision<=0.29.1
        "torch>=2.6,<=2.14.1",
        "torchvision>=0.21,<=0.29.1",
        "transformers>=4.51",
        "diffusers>=0.32",
        "timm>=1.0",
        "einops>=0.8",
        "safetensors>=0.4",
        "webdataset>=0.2.90",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.66",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        # cheers serve
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
        # LoRA fine-tuning, int8 / fp8 weights, CPU offload (cheers.lora, cheers.low_memory)
        "peft>=0.17",
        "torchao>=0.13",
        "accelerate>=1.0",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "pytest-timeout>=2.3", "openai>=1.30", "selenium>=4.11", "httpx>=0.27"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["cheers=cheers.cli:main"]},
)
