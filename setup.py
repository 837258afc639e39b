"""collie: train large language models with 3D parallelism and memory-lean optimizers."""
from setuptools import find_packages, setup

setup(
    name="collie",
    version="0.1.0",
    description="Train Llama-family LLMs with tensor, pipeline and ZeRO data parallelism, LOMO/AdaLomo and PEFT",
    python_requires=">=3.10",
    # The architecture cards in the top-level models/ folder ship inside the package as collie.cards.
    packages=find_packages(include=["collie", "collie.*"]) + ["collie.cards"],
    package_dir={"collie.cards": "models"},
    package_data={"collie.cards": ["*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "transformers>=4.46",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "rich>=13",
        "peft>=0.13",
        "numpy",
        "sacrebleu>=2",
        "rouge-score>=0.1",
    ],
    extras_require={
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "deepspeed": ["deepspeed"],
        "data": ["pyarrow", "datasets"],
        "bench": ["matplotlib"],
        "dev": ["pytest>=8", "lomo-optim", "lion-pytorch", "adan-pytorch", "tensorboard", "wandb", "pyarrow",
                "datasets", "matplotlib", "deepspeed"],
    },
    entry_points={"console_scripts": ["collie=collie.cli:main"]},
)
