"""The driver end to end: every shipped config trains a step with no unread key, loss goes down,
bit-exact resume, SIGTERM save, kill -9 leftovers ignored, config mismatch named, NaN stop, 2 processes."""

import dataclasses
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrlhf import config_utils, models, registry
from jaxrlhf.trainer import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
CHAR_TOK = os.path.join(FIX, "tokenizers", "char_pad_eos")


def load_config(relpath):
    path = os.path.join(ROOT, relpath)
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny qwen2 checkpoint in HF format standing in for the real configs' hub models."""
    out = str(tmp_path_factory.mktemp("tiny_qwen"))
    model = models.init(
        "qwen2",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
    )
    models.save_pretrained(model, out)
    return out


TASK_DATA = {"jaxrlhf.tasks.gsm8k:reward": "prompts.jsonl", "jaxrlhf.tasks.code:reward": "code_prompts.jsonl"}


def shrink(config, tiny_hf):
    """Points a real experiment config at tiny local models and fixture data, one step long."""
    c = config
    algo = c.algorithm
    with c.unlocked():
        if c.model.path:
            c.model.path = tiny_hf
            c.model.dtype = "float32"
        if c.model.path or not os.path.isdir(c.tokenizer):  # a hub model's tokenizer: the fixture's
            c.tokenizer = CHAR_TOK
        c.mesh = dict(data=1, fsdp=1, tensor=1)
        c.progress_bar = False
        c.export_hf = True
        c.checkpoint.async_save = False
        if "total_steps" in c:  # the offline driver
            c.total_steps = 2
            c.log_every = 1
            c.batch_size = 8
            c.micro_batches = min(c.micro_batches, 2)
            c.pad_to_multiple_of = c.data.max_length
            if c.eval_every:
                c.eval_every = 2
                c.eval_batches = 1
        if not c.data.path.startswith(FIX):
            fn = c.reward.get("fn", "") if "reward" in c else ""  # task rewards need rows with their columns
            name = TASK_DATA.get(fn) or {"sft": "sft_messages.jsonl"}.get(algo, "hh_rlhf.jsonl")
            c.data.path = os.path.join(FIX, "data", name)
            c.data.max_prompt_length, c.data.max_length = 192, 320
            c.data.split = "train"
            if c.data.get("eval_split"):
                c.data.eval_split = c.data.path
        if algo == "ppo":
            c.ppo.iterations = 1
            c.ppo.rollout_batch_size, c.ppo.minibatch_size = 8, 4
            c.micro_batches = 2
            c.generation.max_new_tokens = 4
            if c.critic.model.path:
                c.critic.model.path = tiny_hf
            if c.reward.fn == "" and c.reward.model.path:
                c.reward.model.path = tiny_hf
        if algo == "grpo":
            c.grpo.iterations = 1
            c.grpo.prompts_per_iteration, c.grpo.samples_per_prompt = 4, 2
            c.grpo.minibatch_size = 4
            c.micro_batches = 2
            c.generation.max_new_tokens = 4
            if not c.reward.fn and c.reward.model.path:
                c.reward.model.path = tiny_hf
        if algo == "dpo_iter":
            c.dpo_iter.rounds = 1
            c.dpo_iter.prompts_per_round, c.dpo_iter.samples_per_prompt = 8, 2
            c.dpo_iter.steps_per_round = 1
            c.batch_size = 4
            c.generation.max_new_tokens = 4
            if not c.reward.fn and c.reward.model.path:
                c.reward.model.path = tiny_hf
        c.log_every = 1
    return c


SHIPPED = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    # experiments and quickstart stages read files made by earlier stages; their own tests run them
    if "/experiments/" not in p and "/quickstart/" not in p and not os.path.basename(p).startswith("_")
)


@pytest.mark.slow
@pytest.mark.parametrize("relpath", SHIPPED)
def test_every_shipped_config_trains_and_reads_every_key(relpath, tiny_hf, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = shrink(load_config(relpath), tiny_hf)
    tracked = config_utils.ReadTracker(raw)
    result = registry.run(tracked, str(tmp_path / "w"))
    assert config_utils.unread_keys(raw, tracked.reads) == [], relpath
    assert result["step"] >= 1 and not result["interrupted"]
    assert os.path.exists(os.path.join(result["export_dir"], "config.json"))
    last = result["history"][-1]
    assert all(np.isfinite(v) for v in last.values() if np.ndim(v) == 0), last


@pytest.mark.parametrize("name,metric", [("sft", "nll"), ("reward", "bt_loss"), ("dpo", "dpo_loss")])
def test_tiny_configs_learn(name, metric, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = load_config(f"configs/tiny/{name}.py")
    with c.unlocked():
        c.log_every = 1
        c.checkpoint.async_save = False
    result = registry.run(c, str(tmp_path / name))
    first = np.mean([h[metric] for h in result["history"][:3]])
    last = np.mean([h[metric] for h in result["history"][-3:]])
    assert last < first - 0.02, (first, last)
    assert "perf/tokens_per_s" in result["history"][-1]
    assert 0.0 <= result["history"][-1]["data/padding_fraction"] < 1.0
    assert os.path.exists(os.path.join(str(tmp_path / name), "tb"))
    assert os.path.exists(os.path.join(str(tmp_path / name), "config.json"))
    head = "scalar" if name == "reward" else None
    exported = models.from_pretrained(result["export_dir"], head=head)
    assert exported.config.num_layers == 2


def _resume_config(total):
    c = load_config("configs/tiny/sft.py")
    with c.unlocked():
        c.total_steps = total
        c.optim.schedule = "constant"  # a schedule over total_steps would differ between the runs
        c.checkpoint.every = 3
        c.checkpoint.async_save = True
        c.log_every = 1
    return c


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    straight = registry.run(_resume_config(6), str(tmp_path / "a"))
    first = registry.run(_resume_config(3), str(tmp_path / "b"))
    assert first["step"] == 3
    resumed = registry.run(_resume_config(6), str(tmp_path / "b"))
    assert resumed["step"] == 6 and len(resumed["history"]) == 3  # steps 4..6 only
    a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        [h["loss"] for h in straight["history"][3:]], [h["loss"] for h in resumed["history"]]
    )


def test_resume_with_changed_config_names_the_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    registry.run(_resume_config(3), str(tmp_path / "r"))
    c = _resume_config(4)
    with c.unlocked():
        c.optim.lr = 0.5
        c.batch_size = 4
    with pytest.raises(ValueError, match=r"optim\.lr.*batch_size|batch_size.*optim\.lr"):
        registry.run(c, str(tmp_path / "r"))


def test_partial_checkpoint_from_kill9_is_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    w = tmp_path / "k"
    registry.run(_resume_config(3), str(w))
    # What a save killed mid-write leaves behind: orbax's temporary directory for a later step.
    junk = w / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000000000"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\x00" * 100)
    resumed = registry.run(_resume_config(4), str(w))
    assert resumed["step"] == 4 and len(resumed["history"]) == 1


def test_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sft = registry.get("sft")

    def nan_build(config, graphdef):
        loss_fn, den = sft.build_loss(config, graphdef)

        def nan_loss(*args):
            loss, metrics = loss_fn(*args)
            return loss * jnp.nan, metrics

        return nan_loss, den

    monkeypatch.setitem(registry.REGISTRY, "sft", dataclasses.replace(sft, build_loss=nan_build))
    c = _resume_config(10)
    with c.unlocked():
        c.max_consecutive_skips = 3
        c.checkpoint.every = 1
    with pytest.raises(harness.TooManySkips, match="3 consecutive steps"):
        registry.run(c, str(tmp_path / "nan"))
    # every update was skipped: no checkpoint is written while the streak is open
    steps = [d for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit()]
    assert steps == []


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    w = str(tmp_path / "sig")
    cmd = [
        sys.executable, "-m", "jaxrlhf.train", "--config=configs/tiny/sft.py", f"--workdir={w}",
        "--config.total_steps=100000", "--config.checkpoint.every=100000", "--config.log_every=1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in proc.stderr:
        if "step 3:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, out[-3000:]
    steps = [
        int(os.path.basename(p))
        for p in glob.glob(os.path.join(w, "checkpoints", "*"))
        if os.path.basename(p).isdigit()
    ]
    assert steps and 3 <= max(steps) < 100000
    assert "will checkpoint and stop" in out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives on localhost) == 1 process x 8 devices."""
    common = [
        sys.executable, "-m", "jaxrlhf.train", "--config=configs/tiny/dpo.py", "--config.total_steps=3",
        "--config.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.optim.name=sgd",
        "--config.optim.b1=0.0", "--config.checkpoint.async_save=False",
    ]  # fmt: skip
    one = subprocess.run(
        common + [f"--workdir={tmp_path / 'one'}"],
        cwd=ROOT,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = _env(4)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(
            subprocess.Popen(
                common + [f"--workdir={tmp_path / 'two'}"],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    assert "process 1 of 2" in errs[1] or "process 0 of 2" in errs[0]
    a = load_file(os.path.join(tmp_path / "one", "hf", "model.safetensors"))
    b = load_file(os.path.join(tmp_path / "two", "hf", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_precomputed_reference_logps_match_the_in_step_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)

    def cfg(precompute):
        c = load_config("configs/tiny/dpo.py")
        with c.unlocked():
            c.total_steps, c.log_every = 4, 1
            c.ref.precompute = precompute
            c.export_hf = False
        return c

    live = registry.run(cfg(False), str(tmp_path / "live"))
    pre = registry.run(cfg(True), str(tmp_path / "pre"))
    assert pre["state"].ref_params is None and live["state"].ref_params is not None
    for k in ("dpo_loss", "rewards/margin", "logps/chosen"):
        np.testing.assert_allclose(
            [h[k] for h in live["history"]], [h[k] for h in pre["history"]], rtol=2e-4, atol=1e-5, err_msg=k
        )
    c = cfg(True)
    with c.unlocked():
        c.ref.ema_decay = 0.9
    with pytest.raises(ValueError, match="precompute needs a frozen reference"):
        registry.run(c, str(tmp_path / "bad"))


@pytest.mark.parametrize("name", ["dpo", "reward"])
def test_packed_preference_run_matches_padded(name, tmp_path, monkeypatch):
    """``data.packing=True`` through ``registry.run`` (per-micro-batch packing; DPO also with the
    precomputed reference): the same loss history as padded batches, with less padding."""
    monkeypatch.chdir(ROOT)

    def cfg(packing, **extra):
        c = load_config(f"configs/tiny/{name}.py")
        with c.unlocked():
            c.total_steps, c.log_every, c.export_hf, c.micro_batches = 4, 1, False, 2
            c.data.packing = packing
            for k, v in extra.items():
                c.ref[k] = v
        return c

    padded = registry.run(cfg(False), str(tmp_path / "padded"))
    runs = [registry.run(cfg(True), str(tmp_path / "packed"))]
    if name == "dpo":
        runs.append(registry.run(cfg(True, precompute=True), str(tmp_path / "packed_pre")))
    for run in runs:
        np.testing.assert_allclose(
            [h["loss"] for h in run["history"]], [h["loss"] for h in padded["history"]], rtol=2e-4, atol=1e-5
        )
        pad = np.mean([h["data/padding_fraction"] for h in run["history"]])
        padded_pad = np.mean([h["data/padding_fraction"] for h in padded["history"]])
        # The reward fixture's transcripts are mostly longer than half a row: nothing to pack there.
        assert pad < padded_pad if name == "dpo" else pad <= padded_pad


@pytest.mark.slow
def test_persistent_compilation_cache_and_compile_count(tmp_path):
    """``config.compilation_cache_dir`` fills JAX's cache on the first run; the rerun's compiles
    (one fixed batch shape: one compile, counted and timed in the log) load from it."""
    cache = tmp_path / "cache"
    env = dict(_env(1), JAX_PLATFORMS="cpu")

    def run(name):
        cmd = [
            sys.executable, "-m", "jaxrlhf.train", "--config=configs/tiny/sft.py",
            f"--workdir={tmp_path / name}", f"--config.compilation_cache_dir={cache}",
            "--config.total_steps=4", "--config.log_every=4",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    first = run("a")
    assert "perf/compiles=1" in first
    assert any(cache.iterdir())  # the compiled step was written to the cache
    entries = sorted(p.name for p in cache.iterdir())
    second = run("b")
    assert "perf/compiles=1" in second
    assert sorted(p.name for p in cache.iterdir()) == entries  # the rerun hit the cache: nothing new


def test_divergence_guard_stops_on_a_spike_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A gradient spike injected at step 5 (the loss x 1e4) is skipped by the guard; with
    max_consecutive_skips=1 the run stops naming step 5, and the newest checkpoint is step 4's."""
    monkeypatch.chdir(ROOT)
    sft = registry.get("sft")

    def spiky_build(config, graphdef):
        loss_fn, den = sft.build_loss(config, graphdef)

        def spiky(params, ref_params, batch, denoms, rng):
            loss, metrics = loss_fn(params, ref_params, batch, denoms, rng)
            return loss * jnp.where(denoms["step"] == 4, 1e4, 1.0), metrics  # state.step 4 = step 5

        return spiky, den

    monkeypatch.setitem(registry.REGISTRY, "sft", dataclasses.replace(sft, build_loss=spiky_build))
    c = _resume_config(10)
    with c.unlocked():
        c.max_consecutive_skips = 1
        c.checkpoint.every = 1
        c.checkpoint.async_save = False
        c.guard = dict(factor=5.0, warmup=2, decay=0.9)
    with pytest.raises(harness.TooManySkips, match="step 5: 1 consecutive steps"):
        registry.run(c, str(tmp_path / "spike"))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "spike" / "checkpoints") if d.isdigit())
    assert steps[-1] == 4


def _interrupted_equals_straight(name, length_key, n, tmp_path, **over):
    """``name``'s tiny config run for ``n`` units straight vs ``n - 1`` then resumed to ``n``:
    the final train states must be bit-identical (reward model, DPO-Iter: resume is not SFT-only)."""

    def cfg(total):
        c = load_config(f"configs/tiny/{name}.py")
        with c.unlocked():
            node, key = (
                (c[length_key.split(".")[0]], length_key.split(".")[1])
                if "." in length_key
                else (c, length_key)
            )
            node[key] = total
            c.checkpoint.every = 1
            c.checkpoint.async_save = False
            c.export_hf = False
            c.optim.schedule = "constant"
            for k, v in over.items():
                c[k] = v
        return c

    straight = registry.run(cfg(n), str(tmp_path / "a"))
    registry.run(cfg(n - 1), str(tmp_path / "b"))
    resumed = registry.run(cfg(n), str(tmp_path / "b"))
    assert len(resumed["history"]) == 1
    a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_reward_model_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _interrupted_equals_straight("reward", "total_steps", 4, tmp_path, eval_every=0)


@pytest.mark.slow
def test_dpo_iter_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _interrupted_equals_straight("dpo_iter", "dpo_iter.rounds", 3, tmp_path)
