"""What ``configs/*.py`` import: ``base(algorithm)`` plus every section builder of
``jaxrlhf.config_sections`` (``d.model``, ``d.data``, ``d.optim``, ``d.ref``, ``d.generation``,
``d.reward``, ``d.bradley_terry``, ``d.dpo``, ``d.simpo``, ``d.ppo``, ``d.dpo_iter``, ...).

``base(algorithm)`` asks the algorithm's registry record which run-length keys and default
sections to add; an experiment file then sets its own keys.
"""

from __future__ import annotations

import os

import ml_collections

from jaxrlhf import registry
from jaxrlhf.config_sections import *  # noqa: F403 - the section builders are this module's API
from jaxrlhf.config_sections import common, language_model_keys


def base(algorithm: str) -> ml_collections.ConfigDict:
    """The common keys, the driver's run-length keys and the algorithm's default sections."""
    record = registry.get(algorithm)
    c = common(algorithm)
    if record.head is None:
        language_model_keys(c)
    if record.run_keys is not None:
        record.run_keys(c)
    for name, make in record.sections.items():
        c[name] = make()
    return c


def asset(relpath: str) -> str:
    """The absolute path of a file shipped inside the installed package (``jaxrlhf/<relpath>``),
    whatever the current directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, relpath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no package asset jaxrlhf/{relpath} (looked in {path})")
    return path
