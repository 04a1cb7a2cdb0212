"""The algorithm registry: ``config.algorithm`` -> its ``Algorithm`` record.

To add an algorithm: write ``jaxrlhf/algorithms/<name>.py`` ending in an ``ALGORITHM`` record,
add the module to ``_MODULES`` below, and give it a config section in ``jaxrlhf.config_sections``.
"""

from __future__ import annotations

from jaxrlhf.algorithms import dpo, dpo_iter, grpo, ppo, reward, sft, simpo
from jaxrlhf.algorithms.base import Algorithm

_MODULES = (sft, reward, dpo, simpo, ppo, dpo_iter, grpo)
REGISTRY: dict[str, Algorithm] = {m.ALGORITHM.name: m.ALGORITHM for m in _MODULES}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Algorithm:
    """The record of ``name``; an unknown name is an error listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"config.algorithm={name!r}; expected one of {', '.join(REGISTRY)}") from None


def run(config, workdir: str) -> dict:
    """Runs ``config.algorithm`` with its driver in ``workdir``."""
    algorithm = get(config.algorithm)
    return algorithm.run(config, workdir, algorithm)
