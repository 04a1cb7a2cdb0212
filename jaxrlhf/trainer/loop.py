"""``run(config, workdir)``: the offline-training driver for SFT, reward models and DPO.

Read top to bottom: distributed -> mesh -> data -> model -> shard -> update step ->
checkpoint/resume -> loop -> export. PPO and iterative DPO have their own drivers
(``jaxrlhf.ppo``, ``jaxrlhf.dpo_iter``) built from the same pieces.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxrlhf import config_utils, distributed, models
from jaxrlhf import data as data_lib
from jaxrlhf.sharding import (
    activation_mesh,
    batch_sharding,
    make_mesh,
    named_shardings,
    path_str,
    replicated,
    shard_batch,
)
from jaxrlhf.trainer import algorithms, checkpoint
from jaxrlhf.trainer import state as state_lib
from jaxrlhf.trainer.logger import Logger, mean_metrics, quiet_libraries
from jaxrlhf.trainer.optim import make_optimizer
from jaxrlhf.trainer.step import make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TooManySkips(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Model: loaded (or randomly initialised) directly into its sharded layout.
# ----------------------------------------------------------------------------------------------
def partition_rules(config, model_config) -> list:
    rules = config.partition_rules
    if rules:
        from jax.sharding import PartitionSpec

        return [(r, PartitionSpec(*spec)) for r, spec in rules]
    return models.partition_rules(model_config)


def load_model(config, mcfg, mesh, *, head=None):
    """``(graphdef, params, model_config)`` with params sharded on ``mesh``.

    ``mcfg`` is a ``config.model``-like section: ``path`` (HF-format dir or hub id) or, when
    ``path`` is empty, ``family`` + ``init`` overrides for a randomly initialised model (seeded by
    ``config.seed``).
    """
    dtype, param_dtype = DTYPES[mcfg.dtype], DTYPES[mcfg.param_dtype]
    remat = mcfg.remat
    if mcfg.path:
        probe = models.load_config(mcfg.path, head=head)
        rules = partition_rules(config, probe)
        model = models.from_pretrained(
            mcfg.path, dtype=dtype, param_dtype=param_dtype, head=head, mesh=mesh, rules=rules, remat=remat
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
            **overrides,
        )

    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(abs_state)
    shardings = named_shardings(mesh, partition_rules(config, abstract.config), abs_params)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make())[1]), out_shardings=shardings)()
    return graphdef, params, abstract.config


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


def state_shardings(tx, params, mesh, *, with_ref: bool):
    ps = jax.tree.map(lambda x: x.sharding, params)
    return state_lib.TrainState(
        step=replicated(mesh),
        params=ps,
        opt_state=opt_state_shardings(tx, params, ps, mesh),
        ref_params=ps if with_ref else None,
        rng=replicated(mesh),
        skipped=replicated(mesh),
        consecutive_skips=replicated(mesh),
    )


def create_state(tx, params, shardings, *, with_ref: bool, seed: int):
    def make(params):
        ref = jax.tree.map(jnp.copy, params) if with_ref else None
        return state_lib.create(params, tx, ref_params=ref, rng=jax.random.key_data(jax.random.key(seed)))

    return jax.jit(make, out_shardings=shardings)(params)


# ----------------------------------------------------------------------------------------------
# Jitted step with in/out shardings and a donated state; AOT-compiled once to log memory.
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

    def precompile(self, state, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        """Compiles ahead for a batch shape (``{key: (shape, dtype)}``), e.g. every bucket length."""
        key = tuple(sorted((k, tuple(shape)) for k, (shape, _) in batch_shapes.items()))
        if key not in self.executables:
            abstract = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_shapes.items()}
            self.executables[key] = self.jitted.lower(state, abstract).compile()
            self.memory = log_memory(self.executables[key], key)

    def __call__(self, state, batch):
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        exe = self.executables.get(key)
        if exe is None:
            exe = self.executables[key] = self.jitted.lower(state, batch).compile()
            self.memory = log_memory(exe, key)
        return exe(state, batch)


def jit_step(step_fn, shardings, mesh) -> CompiledStep:
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
# Data.
# ----------------------------------------------------------------------------------------------
DATA_KIND = {"sft": "sft", "reward": "preference", "dpo": "preference"}


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


class WithReferenceLogps:
    """A preference dataset whose batches also carry precomputed ``ref_chosen_logps`` /
    ``ref_rejected_logps`` ``[B]`` (the frozen reference's summed response log-probs)."""

    def __init__(self, dataset, chosen: np.ndarray, rejected: np.ndarray):
        self.dataset, self.chosen, self.rejected = dataset, chosen, rejected

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def collate(self, indices, *args, **kwargs):
        return self._with_ref(self.dataset.collate(indices, *args, **kwargs), indices)

    def collate_packed(self, indices, *args, **kwargs):
        return self._with_ref(self.dataset.collate_packed(indices, *args, **kwargs), indices)

    def _with_ref(self, out: dict, indices) -> dict:
        idx = np.asarray(indices)
        safe = np.maximum(idx, 0)
        out["ref_chosen_logps"] = np.where(idx >= 0, self.chosen[safe], 0.0).astype(np.float32)
        out["ref_rejected_logps"] = np.where(idx >= 0, self.rejected[safe], 0.0).astype(np.float32)
        return out

    @classmethod
    def compute(cls, dataset, ref_logps_fn, ref_params, config, mesh) -> WithReferenceLogps:
        """One pass over ``dataset`` in order (global batches of ``config.batch_size``, every
        process taking part); every process ends with the whole table."""
        n, B = len(dataset), config.batch_size
        chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
        per = B // jax.process_count()
        lo = jax.process_index() * per
        t0 = time.perf_counter()
        for start in range(0, n, B):
            idx = np.arange(start, start + B)
            idx = np.where(idx < n, idx, -1)
            host = dataset.collate(idx[lo : lo + per].tolist(), dataset.max_length, dataset.pad_id)
            c, r = ref_logps_fn(ref_params, shard_batch(mesh, host))
            c, r = gather(c), gather(r)
            valid = idx >= 0
            chosen[idx[valid]], rejected[idx[valid]] = c[valid], r[valid]
        logging.info("reference log-probs precomputed for %d pairs in %.1fs", n, time.perf_counter() - t0)
        return cls(dataset, chosen, rejected)


def gather(x) -> np.ndarray:
    """A (possibly multi-process) global array as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_token_counts(batch: dict) -> tuple[float, float]:
    """(real, padded) token counts of this process's part of a batch."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    real = float(sum(np.sum(m) for m in masks))
    padded = float(sum(m.size for m in masks))
    return real, padded


# ----------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------
def check_resume_config(workdir: str, config) -> None:
    """Writes the resolved config once; on resume, names every key that changed incompatibly."""
    path = os.path.join(workdir, "config.json")
    raw = config_utils.unwrap(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        bad = config_utils.incompatible_keys(saved, raw)
        if bad:
            raise ValueError(
                f"cannot resume from {workdir}: the config differs from the saved one in " + "; ".join(bad)
            )
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config_utils.to_json(raw))


def validate(config) -> None:
    """Checks the run-length keys of an offline run up front, with messages naming the key."""
    positive = (
        "total_steps",
        "batch_size",
        "micro_batches",
        "log_every",
        "pad_to_multiple_of",
        "eval_batches",
    )
    for key in positive:
        if config[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    if config.eval_every < 0:
        raise ValueError(f"config.eval_every must be >= 0 (0: no evaluation), got {config.eval_every}")
    if config.max_consecutive_skips < 1:
        raise ValueError(f"config.max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}")
    if config.checkpoint.every < 1:
        raise ValueError(f"config.checkpoint.every must be >= 1, got {config.checkpoint.every}")


def run(config, workdir: str) -> dict[str, Any]:
    """Trains ``config.algorithm`` in ``workdir``; returns the final metrics and status."""
    algo = config.algorithm
    if algo == "ppo":
        from jaxrlhf.ppo import run as run_ppo

        return run_ppo(config, workdir)
    if algo == "dpo_iter":
        from jaxrlhf.dpo_iter import run as run_dpo_iter

        return run_dpo_iter(config, workdir)
    distributed.maybe_initialize()
    quiet_libraries()
    check_resume_config(workdir, config)
    validate(config)

    # ---------------- mesh ----------------
    mesh = make_mesh(config.mesh)
    logging.info("mesh: %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # ---------------- data ----------------
    tokenizer = data_lib.load_tokenizer(config.tokenizer)
    train_it, eval_ds = make_data(config, tokenizer, DATA_KIND[algo], mesh)

    # ---------------- model ----------------
    head = "scalar" if algo == "reward" else None
    graphdef, params, model_config = load_model(config, config.model, mesh, head=head)
    logging.info("model: %s, %.2fM parameters", model_config.family, models.count_params(params) / 1e6)

    # ---------------- update step ----------------
    loss_fn, denominators, uses_ref = algorithms.build(config, graphdef)
    if uses_ref and config.ref.get("precompute", False):
        if config.ref.ema_decay != 1.0 or config.ref.reset_every:
            raise ValueError("config.ref.precompute needs a frozen reference (ema_decay=1.0, reset_every=0)")
        ref_logps = jax.jit(algorithms.make_ref_logps_fn(graphdef))
        train_it.dataset = WithReferenceLogps.compute(train_it.dataset, ref_logps, params, config, mesh)
        if eval_ds is not None:
            eval_ds = WithReferenceLogps.compute(eval_ds, ref_logps, params, config, mesh)
        uses_ref = False  # the reference lives in the batches now, not in the train state
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    if config.batch_size % config.micro_batches:
        raise ValueError(
            f"config.batch_size={config.batch_size} not divisible by micro_batches={config.micro_batches}"
        )
    step_fn = make_train_step(
        loss_fn,
        denominators,
        tx,
        num_micro_batches=config.micro_batches,
        ema_decay=config.ref.ema_decay if uses_ref else 1.0,
        ref_reset_every=config.ref.reset_every if uses_ref else 0,
    )
    shardings = state_shardings(tx, params, mesh, with_ref=uses_ref)
    state = create_state(tx, params, shardings, with_ref=uses_ref, seed=config.seed)
    del params
    train_step = jit_step(step_fn, shardings, mesh)
    if config.eval_every > 0 and eval_ds is None:
        raise ValueError("config.eval_every > 0 but config.data has no eval_split or eval_fraction")
    eval_step = make_eval_step(loss_fn, denominators, mesh) if eval_ds is not None else None

    # ---------------- checkpoint / resume ----------------
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(state, shardings))
    start = 0
    if restored is not None:
        start, state, side = restored
        train_it.set_state(side["data"])
    stop = checkpoint.StopSignal()
    log = Logger(workdir, config.total_steps, start, progress_bar=config.progress_bar)
    result: dict[str, Any] = {"step": start, "interrupted": False, "history": []}

    # ---------------- loop ----------------
    history: list[dict] = []
    step = start
    try:
        for step in range(start + 1, config.total_steps + 1):
            host_batch = next(train_it)
            batch = shard_batch(mesh, host_batch)
            state, metrics = train_step(state, batch)
            history.append(metrics)
            log.count_tokens(*batch_token_counts(host_batch))
            if step % config.log_every == 0 or step == config.total_steps:
                host = mean_metrics(history)
                history = []
                host["lr"] = float(
                    schedule(int(jax.device_get(state.step)) - int(jax.device_get(state.skipped)))
                )
                host["data/padding_fraction"] = train_it.last_padding_fraction
                host["skipped_total"] = float(jax.device_get(state.skipped))
                result["metrics"] = log.write(step, host)
                result["history"].append(result["metrics"])
                consecutive = int(jax.device_get(state.consecutive_skips))
                if consecutive >= config.max_consecutive_skips:
                    raise TooManySkips(
                        f"{consecutive} consecutive steps had a non-finite loss or gradient (step {step}); "
                        "stopping without applying any of them. Lower optim.lr, check the data, or use "
                        "float32 compute (model.dtype)."
                    )
            if eval_step is not None and config.eval_every > 0 and step % config.eval_every == 0:
                result["eval"] = run_eval(eval_step, state, eval_ds, config, mesh)
                log.write_prefixed(step, "eval", result["eval"])
            if step % config.checkpoint.every == 0 or stop.requested:
                checkpoint.save(manager, step, state, {"data": train_it.get_state()})
            if stop.requested:
                result["interrupted"] = True
                break
        else:
            if manager.latest_step() != step:
                checkpoint.save(manager, step, state, {"data": train_it.get_state()}, force=True)
    finally:
        manager.wait_until_finished()
        stop.restore_handlers()
        log.close()
    result["step"] = step
    result["memory"] = train_step.memory
    result["state"] = state
    result["graphdef"] = graphdef
    result["model_config"] = model_config

    # ---------------- export ----------------
    if config.export_hf and not result["interrupted"]:
        result["export_dir"] = export_hf(graphdef, state.params, os.path.join(workdir, "hf"))
    return result


def make_eval_step(loss_fn, denominators, mesh):
    def eval_fn(params, ref_params, batch):
        with activation_mesh(mesh):
            loss, metrics = loss_fn(params, ref_params, batch, denominators(batch), jax.random.key(0))
        return {**metrics, "loss": loss}

    return jax.jit(eval_fn, out_shardings=replicated(mesh))


def run_eval(eval_step, state, eval_ds, config, mesh) -> dict[str, float]:
    """Mean metrics over the first ``config.eval_batches`` batches of the eval split (in order)."""
    it = data_lib.BatchIterator(eval_ds, config.batch_size, shuffle=False, repeat=False, packing=False)
    history = []
    for i, host in enumerate(it):
        if i >= config.eval_batches:
            break
        history.append(eval_step(state.params, state.ref_params, shard_batch(mesh, host)))
    return mean_metrics(history)


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
