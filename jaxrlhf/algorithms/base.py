"""``Algorithm``: the one record that says everything algorithm-specific.

Every place that used to ask "which algorithm?" reads the record instead: the data kind the
pipeline builds, the model head, whether a reference policy is kept, how the loss and its global
denominators are built, the default config sections, the keys a resumed run may change, the
config validation, and the driver (the offline loop of ``jaxrlhf.trainer.offline`` or an online
rollout loop in the algorithm's own module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# ``build_loss(config, graphdef) -> (loss_fn, denominators)``; see ``jaxrlhf.trainer.step``.
BuildLoss = Callable[[Any, Any], tuple[Callable, Callable]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the engine needs to know about one algorithm.

    Attributes:
      name: the value of ``config.algorithm``.
      data_kind: the dataset the pipeline builds: ``"sft"``, ``"preference"`` or ``"prompt"``.
      head: the trained model's head: ``None`` (language model) or ``"scalar"``.
      uses_reference: the train state keeps reference parameters (frozen or EMA).
      run: the driver, ``run(config, workdir, algorithm) -> result dict``.
      unit: what one driver iteration is (``"step"``, ``"iteration"``, ``"round"``): the unit of
        ``checkpoint.every`` and ``log_every``.
      build_loss: ``(config, graphdef) -> (loss_fn, denominators)`` for offline algorithms
        (and for online ones whose update is an offline loss, like DPO-Iter).
      prepare: optional offline hook ``(config, graphdef, params, train_it, eval_ds, mesh) ->
        (eval_ds, uses_reference)`` run before the state is built (DPO's precomputed reference).
      probe: optional ``(config, graphdef) -> probe(params, ref_params, batch) -> metrics``, the
        gradient decomposition that ``config.analysis.every`` runs (``jaxrlhf.analysis.gradients``).
      sections: default config sections ``{name: () -> ConfigDict}`` that ``config_defaults.base``
        adds for this algorithm.
      run_keys: adds the driver's run-length keys to a config (``total_steps`` ... for offline runs).
      resumable_keys: algorithm keys a resumed run may change (they never change the saved state).
      validate: ``validate(config)`` raising ``ValueError`` that names the key; ``None``: nothing
        beyond the common checks.
      renamed_keys: ``{old dotted key: new dotted key}`` that users may still have in their files.
    """

    name: str
    data_kind: str
    head: str | None
    uses_reference: bool
    run: Callable[..., dict]
    unit: str = "step"
    build_loss: BuildLoss | None = None
    prepare: Callable | None = None
    probe: Callable | None = None
    sections: dict[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    run_keys: Callable[[Any], None] | None = None
    resumable_keys: tuple[str, ...] = ()
    validate: Callable[[Any], None] | None = None
    renamed_keys: dict[str, str] = dataclasses.field(default_factory=dict)
