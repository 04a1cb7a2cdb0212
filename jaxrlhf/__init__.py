"""jaxrlhf: aligning language models with human preferences in JAX/Flax.

SFT, Bradley-Terry reward models, DPO and PPO with GAE (the recipe of Xu et al., ICML 2024:
large batch, advantage normalization, EMA reference), jitted and sharded over a device mesh.
"""

__version__ = "0.1.0"
