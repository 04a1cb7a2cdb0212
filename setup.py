"""jaxrlhf: SFT, Bradley-Terry reward models, DPO and PPO with GAE in pure JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="jaxrlhf",
    version="0.1.0",
    description="Aligning language models with human preferences in JAX/Flax: SFT, reward models, DPO, PPO.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxrlhf", "jaxrlhf.*"]),
    package_data={"jaxrlhf": ["tasks/assets/*", "tasks/assets/**/*"]},
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "transformers>=4.50.0",
        "datasets>=3.0.0",
        "ml-collections>=1.0.0",
        "tensorboardX>=2.6",
        "absl-py>=2.1.0",
        "tqdm>=4.66.0",
        "safetensors>=0.4.3",
    ],
    extras_require={
        "demo": ["matplotlib>=3.8"],
        # torch (CPU; `make test` installs torch==2.13.0 first): the transformers parity and golden
        # checks; peft: the LoRA export is loaded with peft onto the transformers base model
        "test": [
            "pytest>=8.0", "pytest-xdist>=3.5", "chex>=0.1.88", "ruff>=0.6.0", "matplotlib>=3.8", "peft>=0.13",
            "torch>=2.4",
        ],  # fmt: skip
        "bench": ["matplotlib>=3.8", "trl>=0.19", "torch>=2.4"],
    },
)
