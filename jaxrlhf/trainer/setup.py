"""The one setup path: mesh -> model (loaded straight into its shards) -> optimizer -> train state
and its shardings -> the jitted step, shared by every driver and the benchmarks.

``build_offline`` puts the pieces together for an offline loss (SFT, reward model, DPO family; also
DPO-Iter's update); PPO and the critic-free family use ``load_model``, ``make_state`` and
``train_step_fn`` with their own two-model parameters and their scanned update.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from jaxrlhf import data as data_lib
from jaxrlhf import lora as lora_lib
from jaxrlhf import models
from jaxrlhf.sharding import (
    activation_mesh,
    batch_sharding,
    named_shardings,
    path_str,
    replicated,
)
from jaxrlhf.trainer import state as state_lib
from jaxrlhf.trainer.guard import Guard, init_stats
from jaxrlhf.trainer.optim import make_optimizer
from jaxrlhf.trainer.step import make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------
# Model: loaded (or randomly initialised) directly into its sharded layout.
# ----------------------------------------------------------------------------------------------
def partition_rules(config, model_config) -> list:
    """``config.partition_rules`` when set, else the model's default (regex, PartitionSpec) list."""
    rules = config.partition_rules
    if rules:
        from jax.sharding import PartitionSpec

        return [(r, PartitionSpec(*spec)) for r, spec in rules]
    return models.partition_rules(model_config)


def load_model(config, mcfg, mesh, *, head=None, config_key: str = "model.path"):
    """``(graphdef, params, model_config)`` with params sharded on ``mesh``.

    ``mcfg`` is a ``config.model``-like section: ``path`` (HF-format dir or hub id) or, when
    ``path`` is empty, ``family`` + ``init`` overrides for a randomly initialised model (seeded by
    ``config.seed``). ``config_key`` names the key in errors about the path.
    """
    dtype, param_dtype = DTYPES[mcfg.dtype], DTYPES[mcfg.param_dtype]
    remat, attention = mcfg.remat, mcfg.attention
    if attention not in models.ATTENTION_IMPLS:
        key = config_key.rsplit(".", 1)[0] + ".attention"
        raise ValueError(f"config.{key}={attention!r}: expected one of {models.ATTENTION_IMPLS}")
    if attention == "splash" and jax.default_backend() != "tpu":
        key = config_key.rsplit(".", 1)[0] + ".attention"
        logging.warning(
            "config.%s='splash' is the TPU kernel: on %s it runs in Pallas's interpreter (slow; meant "
            "for tests). 'portable' or, on GPUs, 'cudnn' are the fast choices here.",
            key,
            jax.default_backend(),
        )
    if mcfg.path:
        probe = models.load_config(mcfg.path, head=head, config_key=config_key)
        rules = partition_rules(config, probe)
        model = models.from_pretrained(
            mcfg.path,
            dtype=dtype,
            param_dtype=param_dtype,
            head=head,
            mesh=mesh,
            rules=rules,
            remat=remat,
            config_key=config_key,
            attention=attention,
        )
        graphdef, state = nnx.split(model)
        return graphdef, nnx.to_pure_dict(state), model.config
    overrides = dict(mcfg.init)

    def make():
        return models.init(
            mcfg.family,
            seed=config.seed,
            dtype=dtype,
            param_dtype=param_dtype,
            head=head,
            remat=remat,
            attention=attention,
            **overrides,
        )

    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(abs_state)
    shardings = named_shardings(mesh, partition_rules(config, abstract.config), abs_params)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make())[1]), out_shardings=shardings)()
    return graphdef, params, abstract.config


# ----------------------------------------------------------------------------------------------
# Train state: created already sharded; optimizer state sharded like the parameters.
# ----------------------------------------------------------------------------------------------
def opt_state_shardings(tx, params, param_shardings, mesh):
    """Optimizer-state shardings mirroring the parameters'.

    An optimizer-state leaf whose path ends with a parameter's path (``.../mu/layers/0/...``) and
    has that parameter's shape is sharded like it; everything else (counts, factored statistics)
    is replicated. Works through ``optax.chain``, ``masked`` and ``multi_transform`` states.
    """
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        by_path[path_str(path)] = (leaf.shape, None)
    for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings):
        by_path[path_str(path)] = (by_path[path_str(path)][0], sh)
    abstract = jax.eval_shape(tx.init, params)

    def one(path, leaf):
        name = path_str(path)
        parts = name.split("/")
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract)


def no_reference(params):
    """``ref_of`` for algorithms without a reference policy."""
    return None


def whole(params):
    """``ref_of`` when the reference mirrors all the trained parameters."""
    return params


def make_state(
    tx,
    params,
    mesh,
    *,
    ref_of: Callable = no_reference,
    seed: int,
    frozen=None,
    follow_reference: bool = True,
    guard=None,
):
    """``(state, shardings)``: a fresh ``TrainState`` created sharded, donation-ready.

    ``guard``: ``config.guard``; the state carries the divergence guard's statistics when it is on.

    ``ref_of(params)`` selects the subtree the reference policy copies (``no_reference``: none;
    ``whole``: all of ``params``; PPO: ``params["actor"]``). ``frozen`` (LoRA: from ``lora_split``)
    is kept as it is (not copied, not in the optimizer); with it and ``follow_reference=False``
    (a frozen reference) the reference holds no adapters: it is the base with the adapters off.
    """
    ref_fn = ref_of
    if frozen is not None and not follow_reference and ref_of is not no_reference:
        ref_fn = lambda p: lora_lib.without_adapters(ref_of(p))  # noqa: E731
    ps = jax.tree.map(lambda x: x.sharding, params)
    shardings = state_lib.TrainState(
        step=replicated(mesh),
        params=ps,
        opt_state=opt_state_shardings(tx, params, ps, mesh),
        ref_params=ref_fn(ps),
        rng=replicated(mesh),
        skipped=replicated(mesh),
        consecutive_skips=replicated(mesh),
    )

    def make(params):
        ref = ref_fn(params)
        ref = None if ref is None else jax.tree.map(jnp.copy, ref)
        return state_lib.create(params, tx, ref_params=ref, rng=jax.random.key_data(jax.random.key(seed)))

    state = jax.jit(make, out_shardings=shardings)(params)
    stats = None if guard is None else init_stats(Guard.from_config(guard))
    if stats is not None:
        state = state.replace(guard=jax.device_put(stats, replicated(mesh)))
        shardings = shardings.replace(guard={k: replicated(mesh) for k in stats})
    if frozen is not None:
        state = state.replace(frozen=frozen)
        shardings = shardings.replace(frozen=jax.tree.map(lambda x: x.sharding, frozen))
    return state, shardings


def train_step_fn(config, loss_fn, denominators, tx, *, ref_of: Callable = no_reference):
    """The generic step (``make_train_step``) with the config's accumulation, reference and LoRA
    settings (``config.lora``: the loss sees the base with the adapters applied, ``lora_views``,
    and with ``config.lora.dropout > 0`` dropout keys drawn from its per-micro-batch key)."""
    with_ref = ref_of is not no_reference
    guard = Guard.from_config(config.guard)
    return make_train_step(
        lora_dropout(config, loss_fn),
        denominators,
        tx,
        num_micro_batches=config.micro_batches,
        ema_decay=config.ref.ema_decay if with_ref else 1.0,
        ref_reset_every=config.ref.reset_every if with_ref else 0,
        ref_of=ref_of,
        views=lora_views(config, ref_of),
        guard_factor=guard.factor,
        guard_warmup=guard.warmup,
        guard_decay=guard.decay,
        guard_loss_factor=guard.loss_factor,
    )


# ----------------------------------------------------------------------------------------------
# LoRA (``jaxrlhf.lora``): the trainable/frozen split and what the losses, samplers and exports see.
# ----------------------------------------------------------------------------------------------
def lora_split(config, params):
    """``(trainable, frozen)`` under ``config.lora`` (adapters sharded like their kernels);
    ``(params, None)`` when LoRA is off."""
    spec = lora_lib.from_config(config)
    if spec is None:
        return params, None
    trainable, frozen = lora_lib.split(params, spec, config.seed)
    logging.info(
        "LoRA rank %d on %s: %.3fM trainable parameters, %.2fM frozen",
        spec.rank,
        spec.targets,
        lora_lib.count(trainable) / 1e6,
        lora_lib.count(frozen) / 1e6,
    )
    return trainable, frozen


def reference_follows(config) -> bool:
    """The reference moves with the policy (EMA or periodic reset), so a LoRA run keeps its adapters."""
    return config.ref.ema_decay < 1.0 or config.ref.reset_every > 0


def lora_views(config, ref_of: Callable = no_reference):
    """``views(params, ref_params, frozen)`` for ``make_train_step`` (``None`` without LoRA): the
    base with the trainable adapters applied (``lora.adapt``: ``AdaptedKernel`` leaves with the
    config's dropout rate, keys added by ``lora_dropout``), and the reference = the base with the
    reference's adapters, never dropped out (none for a frozen reference: adapters off)."""
    spec = lora_lib.from_config(config)
    if spec is None:
        return None

    def views(params, ref_params, frozen):
        full = lora_lib.adapt(params, frozen, spec.scale, spec.dropout)
        if ref_of is no_reference:
            return full, ref_params
        return full, lora_lib.adapt(ref_params, ref_of(frozen), spec.scale)

    return views


def lora_dropout(config, loss_fn):
    """``loss_fn`` as it is, or with ``config.lora.dropout > 0`` a loss that first gives each of the
    policy's adapted kernels its dropout key from the loss's per-micro-batch ``rng``
    (``lora.with_dropout``): a function of the step's key, so resume stays bit-exact."""
    spec = lora_lib.from_config(config)
    if spec is None or spec.dropout == 0.0:
        return loss_fn

    def with_dropout(params, ref_params, batch, denoms, rng):
        return loss_fn(lora_lib.with_dropout(params, rng), ref_params, batch, denoms, rng)

    return with_dropout


def full_params(config, params, frozen):
    """The model's parameters outside a step (sampler, scoring): ``params`` without LoRA, else the
    base with the adapters applied as ``AdaptedKernel`` leaves (``lora.adapt``: nothing merged, no
    new array, no dropout)."""
    if frozen is None:
        return params
    return lora_lib.adapt(params, frozen, lora_lib.from_config(config).scale)


def merged_params(config, params, frozen):
    """Plain arrays outside a step (export, gradient probes): ``params`` without LoRA, else the base
    with ``W + (alpha/r)·A@B`` merged into the targeted kernels (new arrays, sharded like them)."""
    if frozen is None:
        return params
    return lora_lib.materialize(params, frozen, lora_lib.from_config(config).scale)


def reference_params(config, state, ref_of: Callable):
    """The reference policy's parameters outside a step: ``state.ref_params`` without LoRA, else
    the base (``ref_of(state.frozen)``) with the reference's adapters, if it keeps any."""
    if state.frozen is None:
        return state.ref_params
    return full_params(config, state.ref_params or {}, ref_of(state.frozen))


# ----------------------------------------------------------------------------------------------
# Jitted step with in/out shardings and a donated state; AOT-compiled once per batch shape.
# ----------------------------------------------------------------------------------------------
class CompiledStep:
    """A jitted step (in/out shardings, donated state) compiled ahead of time once per batch shape.

    Each new batch shape is lowered and compiled explicitly, which logs the step's memory use,
    and the executable is reused for every later batch of that shape (no second compile).
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self.executables: dict[Any, Any] = {}
        self.memory: dict[str, int] = {}
        self.compiles = 0  # distinct batch shapes compiled (logged as perf/compiles)
        self.compile_s = 0.0  # seconds spent lowering and compiling them (perf/compile_s)

    def _compile(self, key, state, batch):
        t = time.perf_counter()
        exe = self.executables[key] = self.jitted.lower(state, batch).compile()
        self.compiles += 1
        self.compile_s += time.perf_counter() - t
        self.memory = log_memory(exe, key)
        return exe

    def precompile(self, state, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        """Compiles ahead for a batch shape (``{key: (shape, dtype)}``), e.g. every bucket length."""
        key = tuple(sorted((k, tuple(shape)) for k, (shape, _) in batch_shapes.items()))
        if key not in self.executables:
            abstract = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_shapes.items()}
            self._compile(key, state, abstract)

    def __call__(self, state, batch):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        exe = self.executables.get(key)
        if exe is None:
            exe = self._compile(key, state, batch)
        return exe(state, batch)


def jit_step(step_fn, shardings, mesh) -> CompiledStep:
    """``step_fn(state, batch)`` jitted with the state's shardings, batch-sharded inputs, donation."""

    def unwrapped(state, batch):
        with activation_mesh(mesh):
            new_state, metrics = step_fn(state.replace(rng=jax.random.wrap_key_data(state.rng)), batch)
        return new_state.replace(rng=jax.random.key_data(new_state.rng)), metrics

    jitted = jax.jit(
        unwrapped,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    return CompiledStep(jitted)


def log_memory(compiled, key) -> dict:
    """Logs a compiled step's per-device memory (bytes) for one batch shape."""
    stats = {}
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            stats[name] = int(getattr(mem, name, 0) or 0)
        logging.info(
            "compiled step for batch %s; memory per device: args %.1f MiB, outputs %.1f MiB, temps %.1f MiB",
            dict(key),
            *(v / 2**20 for v in stats.values()),
        )
    except Exception as e:  # some backends have no memory analysis
        logging.info("compiled step memory analysis unavailable: %s", e)
    return stats


# ----------------------------------------------------------------------------------------------
# Offline algorithms: data, model, loss, optimizer, state, jitted step in one call.
# ----------------------------------------------------------------------------------------------
def make_data(config, tokenizer, kind: str, mesh=None):
    """``(train_iterator, eval_dataset or None)``; each process reads only its shard of a batch.

    Packed preference batches are packed per micro-batch, with a row count divisible by the
    mesh's batch axes (``data * fsdp``)."""
    train_ds, eval_ds = data_lib.build_datasets(config.data, tokenizer, kind)
    rows = 1 if mesh is None else int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    train_it = data_lib.BatchIterator.from_config(
        train_ds,
        config.data,
        global_batch_size=config.batch_size,
        pad_to_multiple_of=config.pad_to_multiple_of,
        micro_batches=config.get("micro_batches", 1),
        row_multiple=rows,
    )
    return train_it, eval_ds


@dataclasses.dataclass
class Trainable:
    """Everything an offline driver (or a benchmark) needs to take steps."""

    mesh: Any
    graphdef: Any
    model_config: Any
    loss_fn: Callable
    denominators: Callable
    schedule: Callable
    state: Any
    shardings: Any
    step: CompiledStep
    views: Callable | None = None  # LoRA: ``lora_views`` of the step (for evaluation)


def build_offline(
    config,
    algorithm,
    mesh,
    *,
    total_steps: int,
    prepare: Callable | None = None,
    follow_reference: bool | None = None,
) -> Trainable:
    """Model -> loss -> optimizer -> state -> jitted step for ``algorithm`` (an ``Algorithm`` record).

    ``prepare(graphdef, params) -> uses_reference`` runs after the model is loaded and before the
    state exists (DPO's precomputed reference moves the reference into the data and returns False).
    ``follow_reference`` (LoRA only; default ``reference_follows(config)``): the driver moves the
    reference (DPO-Iter's reset), so it keeps adapters.
    """
    if config.batch_size % config.micro_batches:
        raise ValueError(
            f"config.batch_size={config.batch_size} not divisible by micro_batches={config.micro_batches}"
        )
    graphdef, params, model_config = load_model(config, config.model, mesh, head=algorithm.head)
    logging.info("model: %s, %.2fM parameters", model_config.family, models.count_params(params) / 1e6)
    loss_fn, denominators = algorithm.build_loss(config, graphdef)
    uses_ref = algorithm.uses_reference
    if prepare is not None:
        uses_ref = prepare(graphdef, params)
    params, frozen = lora_split(config, params)  # the reference precomputed above is the base: adapters off
    tx, schedule = make_optimizer(config.optim, total_steps)
    ref_of = whole if uses_ref else no_reference
    follows = reference_follows(config) if follow_reference is None and uses_ref else bool(follow_reference)
    state, shardings = make_state(
        tx,
        params,
        mesh,
        ref_of=ref_of,
        seed=config.seed,
        frozen=frozen,
        follow_reference=follows,
        guard=config.guard,
    )
    del params
    step = jit_step(train_step_fn(config, loss_fn, denominators, tx, ref_of=ref_of), shardings, mesh)
    views = lora_views(config, ref_of)
    return Trainable(
        mesh, graphdef, model_config, loss_fn, denominators, schedule, state, shardings, step, views
    )


def export_hf(graphdef, params, out_dir: str) -> str:
    """Writes the trained model in HF format (process 0; sharded arrays gathered first)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        t = time.perf_counter()
        models.save_pretrained(nnx.merge(graphdef, params), out_dir)
        logging.info("exported HF checkpoint to %s in %.1fs", out_dir, time.perf_counter() - t)
    return out_dir


def export_lora(config, graphdef, params, frozen, workdir: str) -> dict[str, str]:
    """A LoRA run's exports: ``<workdir>/hf`` (the merged model, ``W + (alpha/r)·A@B``) and
    ``<workdir>/peft`` (the adapters for ``peft``/vLLM on the HF base, ``lora.export_peft``: causal
    LMs of every family, fused HF modules included; scalar heads and ``config.lora.full`` leaves are
    logged and skipped)."""
    spec = lora_lib.from_config(config)
    merged = merged_params(config, params, frozen)
    out = {"hf": export_hf(graphdef, merged, os.path.join(workdir, "hf"))}
    model_config = nnx.merge(graphdef, merged).config
    del merged
    try:
        out["peft"] = lora_lib.export_peft(
            params, spec, model_config, os.path.join(workdir, "peft"), config.model.path
        )
    except ValueError as e:
        logging.warning("no PEFT export: %s", e)
    return out
