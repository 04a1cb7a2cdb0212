"""Claims of README.md / docs/DESIGN.md that no other test checked, each against a closed form:

* the optimizer settings (``config.optim``): warm-up + cosine / linear / constant schedules,
  AdamW's decoupled weight decay skipping the ``no_decay`` parameters, global-norm clipping,
  Adafactor's parameter-scaled first step;
* the mesh's ``-1`` axis takes the remaining devices; an unmatched parameter is an error naming it;
* SIGINT saves a checkpoint and stops; resuming is bit-exact with a non-constant schedule (DPO, the
  reference in the state); ``<workdir>/tb`` holds every logged metric with its step.

The PPO claims (missing-EOS penalty, score normalisation and clipping, ``kl_mode="loss"``, the
entropy bonus, the adaptive KL coefficient and its restore) are checked in tests/test_golden.py.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import signal
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrlhf import config_defaults as d
from jaxrlhf import registry
from jaxrlhf.sharding import make_mesh, spec_for
from jaxrlhf.trainer.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optim(**kw):
    return ml_collections.ConfigDict(d.optim(**kw))


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_their_closed_forms(kind):
    lr, warmup, total, floor = 0.3, 4, 20, 0.1
    _, sched = make_optimizer(optim(lr=lr, schedule=kind, warmup_steps=warmup, min_lr_ratio=floor), total)
    for s in range(total + 1):
        if s < warmup:
            want = lr * s / warmup
        else:
            frac = (s - warmup) / (total - warmup)
            want = {
                "cosine": lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))),
                "linear": lr * (1 - (1 - floor) * frac),
                "constant": lr,
            }[kind]
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-7), (kind, s)


def _params():
    return {
        "embed": {"embedding": jnp.full((3, 2), 2.0)},
        "layers": {"0": {"q_proj": {"kernel": jnp.full((2, 2), -1.0)}, "input_norm": {"scale": jnp.ones(2)}}},
    }


def test_adamw_decoupled_decay_skips_no_decay_params():
    """Step 1 of AdamW: ``-lr (g / (|g| + eps) + wd p)`` where decay applies, ``-lr g / (|g| + eps)``
    on parameters matching ``no_decay`` ("embed", "norm")."""
    lr, wd = 0.1, 0.5
    tx, _ = make_optimizer(
        optim(lr=lr, warmup_steps=0, schedule="constant", weight_decay=wd, clip_norm=0.0), 10
    )
    p = _params()
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.25), p)
    up, _ = tx.update(g, tx.init(p), p)
    adam = 0.25 / (0.25 + 1e-8)
    np.testing.assert_allclose(up["layers"]["0"]["q_proj"]["kernel"], -lr * (adam + wd * -1.0), rtol=1e-6)
    np.testing.assert_allclose(up["layers"]["0"]["input_norm"]["scale"], -lr * adam, rtol=1e-6)
    np.testing.assert_allclose(up["embed"]["embedding"], -lr * adam, rtol=1e-6)


def test_global_norm_clipping_scales_the_gradient():
    """SGD without momentum: the update is ``-lr g min(1, c / ||g||)`` (global norm over all leaves)."""
    lr, clip = 0.1, 1.0
    tx, _ = make_optimizer(
        optim(name="sgd", b1=0.0, lr=lr, warmup_steps=0, schedule="constant", clip_norm=clip), 10
    )
    p = _params()
    g = jax.tree.map(lambda x: jnp.full_like(x, 3.0), p)
    norm = math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(p)))
    up, _ = tx.update(g, tx.init(p), p)
    for u in jax.tree.leaves(up):
        np.testing.assert_allclose(u, -lr * 3.0 * clip / norm, rtol=1e-6)
    tx, _ = make_optimizer(
        optim(name="sgd", b1=0.0, lr=lr, warmup_steps=0, schedule="constant", clip_norm=0.0), 10
    )
    up, _ = tx.update(g, tx.init(p), p)
    for u in jax.tree.leaves(up):
        np.testing.assert_allclose(u, -lr * 3.0, rtol=1e-6)  # clip_norm 0: no clipping


def test_adafactor_first_step_is_scaled_by_the_parameter_rms():
    """Adafactor (Shazeer & Stern 2018) step 1: ``v = g²`` so ``g / sqrt(v) = sign(g)``, times the
    relative step ``lr * max(rms(p), 1e-3)``; AdamW's first step would be ``lr * sign(g)``."""
    lr = 0.01
    tx, _ = make_optimizer(
        optim(name="adafactor", lr=lr, warmup_steps=0, schedule="constant", clip_norm=0.0), 10
    )
    p = {"w": jnp.array([[3.0, -4.0], [0.0, 5.0]])}
    g = {"w": jnp.array([[0.5, -2.0], [1.0, 0.1]])}
    up, _ = tx.update(g, tx.init(p), p)
    rms = math.sqrt(np.mean(np.square(np.asarray(p["w"]))))
    np.testing.assert_allclose(up["w"], -lr * rms * np.sign(g["w"]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Mesh and partition rules
# ---------------------------------------------------------------------------------------------
def test_mesh_minus_one_takes_the_remaining_devices():
    assert len(jax.devices()) == 8  # tests/conftest.py
    assert dict(make_mesh(dict(data=-1, fsdp=2, tensor=1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(make_mesh(dict(data=1, fsdp=-1, tensor=2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_unmatched_parameter_is_an_error_naming_it():
    rules = (("embed", (None, "fsdp")), ("q_proj/kernel$", ("fsdp", "tensor")))
    assert tuple(spec_for(rules, "layers/0/attn/q_proj/kernel", 2)) == ("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"layers/0/mlp/up_proj/kernel"):
        spec_for(rules, "layers/0/mlp/up_proj/kernel", 2)


# ---------------------------------------------------------------------------------------------
# SIGINT, bit-exact resume with a cosine schedule, tb/ contents
# ---------------------------------------------------------------------------------------------
def _tiny_dpo(total: int):
    path = os.path.join(ROOT, "configs", "tiny", "dpo.py")
    spec = importlib.util.spec_from_file_location("tiny_dpo_claims", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.total_steps = total
    c.optim = d.optim(lr=1e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1)
    c.ref = d.ref(ema_decay=0.8, precompute=False)  # the reference moves: it must be restored too
    c.log_every = 1
    c.checkpoint.every = 100
    c.checkpoint.async_save = False
    c.export_hf = False
    return c


def read_tb_scalars(tb_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from the TFRecord event files (framing: u64 length, u32 crc, data,
    u32 crc), decoded with tensorboardX's bundled protobuf."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
                out.setdefault(v.tag, {})[event.step] = value
    return out


def test_sigint_checkpoints_and_resume_is_bit_exact_with_cosine_schedule(tmp_path, monkeypatch):
    from jaxrlhf.trainer import logger

    monkeypatch.chdir(ROOT)
    straight = registry.run(_tiny_dpo(4), str(tmp_path / "a"))

    write = logger.Logger.write

    def write_then_sigint(self, step, metrics, **kw):
        out = write(self, step, metrics, **kw)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the run: save, then stop
        return out

    monkeypatch.setattr(logger.Logger, "write", write_then_sigint)
    before = signal.getsignal(signal.SIGINT)
    cut = registry.run(_tiny_dpo(4), str(tmp_path / "b"))
    monkeypatch.setattr(logger.Logger, "write", write)
    assert cut["interrupted"] and cut["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone again
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "2")
    resumed = registry.run(_tiny_dpo(4), str(tmp_path / "b"))
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"][2:]]
    for x, y in zip(
        jax.tree.leaves(jax.device_get(straight["state"])),
        jax.tree.leaves(jax.device_get(resumed["state"])),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)

    # tb/ of the straight run: every scalar of the history, at its step.
    tb = read_tb_scalars(str(tmp_path / "a" / "tb"))
    for step, h in enumerate(straight["history"], 1):
        for key in ("loss", "dpo_loss", "rewards/accuracy", "lr", "grad_norm"):
            tags = [t for t in tb if t == key or t.endswith("/" + key)]
            assert tags, (key, sorted(tb))
            assert tb[tags[0]][step] == pytest.approx(h[key], rel=1e-6, abs=1e-7), (key, step)
