"""Fail-safe behaviour under bad input and faults (docs/reliability.md): config validation, path
errors, the pickle refusal, checkpoint fingerprints, restore fallback, failed saves, the loss guard
and the lost-peer watch (the two-process runs are in tests/test_multiprocess_faults.py)."""

import glob
import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxrlhf import config_validation as cv
from jaxrlhf import data as data_lib
from jaxrlhf import models, paths
from jaxrlhf.trainer import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ==============================================================================================
# Config validation.
# ==============================================================================================
def nested(flat: dict) -> ml_collections.ConfigDict:
    """``{"a.b": 1}`` -> a ConfigDict with ``c.a.b == 1`` (only those keys)."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return ml_collections.ConfigDict(root)


def bad_values(rule: cv.Rule) -> list:
    """Values just outside each bound of the rule's intervals, and values of a wrong type."""
    if rule.type is bool:
        return [1, "yes"]
    wrong_type = [True, "1"] + ([2.5] if rule.type is int else [])
    outside = []
    for alt in rule.allowed.split(" or "):
        m = re.match(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$", alt.strip())
        if not m:
            continue
        lo, hi = float(m.group(2)), float(m.group(3))
        step = 1 if rule.type is int else 1e-3
        if np.isfinite(lo):
            outside.append(lo if m.group(1) == "(" else lo - step)
        if np.isfinite(hi):
            outside.append(hi if m.group(4) == ")" else hi + step)
    literal = [float(a) for a in rule.allowed.split(" or ") if re.fullmatch(r"-?\d+(\.\d+)?", a.strip())]
    outside = [v for v in outside if v not in literal and not cv.in_range(v, rule.allowed)]
    if rule.type is int:
        outside = [int(v) for v in outside if float(v).is_integer()]
    return wrong_type + outside


@pytest.mark.parametrize("rule", cv.RULES, ids=lambda r: r.key)
def test_every_rule_rejects_bad_values_naming_key_and_value(rule):
    values = bad_values(rule)
    assert len(values) >= 2, rule
    for value in values:
        with pytest.raises(ValueError) as e:
            cv.validate_config(nested({rule.key: value}))
        msg = str(e.value)
        assert f"config.{rule.key}={value!r}" in msg, msg
        if rule.allowed:
            assert rule.allowed in msg, msg


def test_every_rule_has_an_allowed_spec_or_is_a_bool():
    for rule in cv.RULES:
        assert rule.type in (int, float, bool), rule
        assert rule.allowed or rule.type is bool, rule
        assert len({r.key for r in cv.RULES}) == len(cv.RULES)


@pytest.mark.parametrize(
    "key,bad,good",
    [
        ("optim.lr", -1e-2, 1e-3),
        ("optim.lr", 0.0, 1e-9),
        ("optim.lr", float("nan"), 1.0),
        ("optim.lr", float("inf"), 1e3),
        ("optim.b1", 1.0, 0.0),
        ("optim.b2", -0.1, 0.999),
        ("optim.eps", 0.0, 1e-8),
        ("optim.weight_decay", -1e-4, 0.0),
        ("optim.clip_norm", -1.0, 0.0),
        ("optim.warmup_steps", -1, 0),
        ("optim.min_lr_ratio", 1.5, 1.0),
        ("critic.optim.lr", -1.0, 1e-5),
        ("ppo.clip_eps", 0.0, 0.2),
        ("ppo.gamma", 1.01, 1.0),
        ("ppo.lam", -0.5, 0.0),
        ("ppo.vf_coef", -0.5, 0.0),
        ("ref.ema_decay", 0.0, 1.0),
        ("ref.ema_decay", 1.1, 0.5),
        ("generation.top_p", 0.0, 1.0),
        ("generation.temperature", 0.0, 0.7),
        ("mesh.data", 0, -1),
        ("mesh.fsdp", -2, 4),
        ("batch_size", 0, 1),
        ("batch_size", True, 8),
        ("batch_size", 8.0, 8),
        ("total_steps", 10.5, 10),
        ("data.eval_fraction", 1.0, 0.0),
        ("dpo.label_smoothing", 0.5, 0.25),
        ("grpo.samples_per_prompt", 1, 2),
        ("lora.alpha", 0.0, 16.0),
        ("lora.rank", -1, 0),
        ("bradley_terry.use_margin", 0, False),
    ],
)
def test_hand_written_cases(key, bad, good):
    with pytest.raises(ValueError, match=re.escape(f"config.{key}=")):
        cv.validate_config(nested({key: bad}))
    cv.validate_config(nested({key: good}))


def test_negative_lr_message_names_key_value_and_range():
    c = load_config("configs/tiny/sft.py")
    with c.unlocked():
        c.optim.lr = -1e-2
    with pytest.raises(ValueError) as e:
        cv.validate_config(c)
    assert str(e.value) == "config.optim.lr=-0.01 is outside the allowed range (0, inf)"


def test_int_float_and_bool_types():
    with pytest.raises(ValueError, match=r"config\.micro_batches=True has type bool; expected an int"):
        cv.validate_config(nested({"micro_batches": True}))
    with pytest.raises(ValueError, match=r"config\.export_hf=1 has type int; expected a bool"):
        cv.validate_config(nested({"export_hf": 1}))
    cv.validate_config(nested({"optim.lr": 1, "seed": np.int64(3), "progress_bar": np.bool_(True)}))
    cv.validate_config(nested({"data.chat_template": None}))  # an unset placeholder


def test_absent_sections_are_skipped():
    cv.validate_config(ml_collections.ConfigDict({"seed": 0}))
    cv.validate_config(ml_collections.ConfigDict())


def test_cross_checks_name_both_keys():
    with pytest.raises(ValueError, match=r"batch_size must be a multiple of config\.micro_batches.*=3.*=10"):
        cv.validate_config(nested({"batch_size": 10, "micro_batches": 3}))
    with pytest.raises(ValueError, match=r"rollout_batch_size must be a multiple of config\.ppo\.minibatch"):
        cv.validate_config(nested({"ppo.rollout_batch_size": 12, "ppo.minibatch_size": 8}))
    with pytest.raises(ValueError, match=r"max_prompt_length must be < config\.data\.max_length"):
        cv.validate_config(nested({"data.max_prompt_length": 64, "data.max_length": 64}))
    cv.validate_config(nested({"batch_size": 12, "micro_batches": 3}))


def test_validation_does_not_count_as_reading_keys():
    from jaxrlhf import config_utils

    c = load_config("configs/tiny/sft.py")
    tracked = config_utils.ReadTracker(c)
    cv.validate_config(tracked)
    cv.check_paths(tracked)
    assert tracked.reads == set()


def load_config(relpath):
    path = os.path.join(ROOT, relpath)
    name = "cfg_rel_" + relpath.replace("/", "_")[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.get_config() if hasattr(mod, "get_config") else None


SHIPPED = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if not os.path.basename(p).startswith("_")
)


@pytest.mark.parametrize("relpath", SHIPPED)
def test_every_shipped_config_passes_validation(relpath, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(relpath)
    if config is None:
        pytest.skip(f"{relpath} has no get_config (an experiment script)")
    cv.validate_config(config)


# ==============================================================================================
# Paths.
# ==============================================================================================
@pytest.mark.parametrize(
    "text,local,hub",
    [
        ("Qwen/Qwen2.5-0.5B", False, True),
        ("gpt2", False, True),
        ("Anthropic/hh-rlhf", False, True),
        ("tests/fixtures/tokenizers/char_pad_eos", True, False),
        ("/abs/dir", True, False),
        ("./rel", True, False),
        ("../up", True, False),
        ("~/home", True, False),
        ("train.jsonl", True, False),
        ("data/train.parquet", True, False),
        ("weights/model.safetensors", True, False),
        ("my tokenizer", False, False),
        ("org/na me", False, False),
        ("a--b", False, False),
        ("", False, False),
    ],
)
def test_local_or_hub_shape(text, local, hub):
    assert paths.looks_local(text) == local
    assert paths.looks_like_hub_id(text) == hub


MISSING_LOCAL = [
    "tests/fixtures/tokenizers/nope",
    "./nope",
    "/no/such/dir",
    "~/no_such_jaxrlhf_dir",
    "tok.json",
]


@pytest.mark.parametrize("path", MISSING_LOCAL)
def test_missing_tokenizer_path_says_so(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError) as e:
        data_lib.load_tokenizer(path)
    assert str(e.value) == f"[Errno 2] no such file or directory: {path} (config.tokenizer)"


def test_missing_model_and_reward_model_paths_say_so(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no such file or directory: /no/such/model \(config\.model\.path\)"
    ):
        models.from_pretrained("/no/such/model", config_key="model.path")
    missing = str(tmp_path / "rm" / "hf")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} (config.reward.model.path)")):
        models.load_config(missing, head="scalar", config_key="reward.model.path")


def test_missing_data_paths_say_so(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = data_lib.default_data_config(path="tests/fixtures/data/nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"tests/fixtures/data/nope\.jsonl \(config\.data\.path\)"):
        data_lib.load_rows(cfg)
    cfg = data_lib.default_data_config(
        path="tests/fixtures/data/sft_prompt_completion.jsonl",
        eval_split="tests/fixtures/data/nope_eval.jsonl",
    )
    with pytest.raises(FileNotFoundError, match=r"nope_eval\.jsonl \(config\.data\.eval_split\)"):
        data_lib.load_rows(cfg, "eval")


def test_hub_is_tried_only_for_hub_shaped_ids(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kw):
        calls.append(repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(
        FileNotFoundError, match=r"'org/model' \(config\.model\.path\) is not a local directory"
    ):
        models.load_config("org/model", config_key="model.path")
    with pytest.raises(FileNotFoundError, match="no such file or directory: org/sub/model"):
        models.load_config("org/sub/model")
    with pytest.raises(ValueError, match="neither an existing file or directory nor a hub id"):
        models.load_config("org/na me")
    assert calls == ["org/model"]


def test_check_paths_names_each_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    c = load_config("configs/tiny/sft.py")
    cv.check_paths(c)  # the shipped tiny paths exist
    for key in ("tokenizer", "model.path", "data.path"):
        bad = c.copy_and_resolve_references()
        node = bad
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        with bad.unlocked():
            node[last] = str(tmp_path / "missing" / "thing")
        with pytest.raises(FileNotFoundError, match=re.escape(f"(config.{key})")):
            cv.check_paths(bad)
    ppo = nested({"reward.model.path": "./no_rm", "critic.model.path": "Qwen/Qwen2.5-0.5B"})
    with pytest.raises(
        FileNotFoundError, match=r"no such file or directory: \./no_rm \(config\.reward\.model\.path\)"
    ):
        cv.check_paths(ppo)
    cv.check_paths(nested({"data.path": "Anthropic/hh-rlhf", "data.eval_split": "test"}))  # split names pass


def test_pickle_refusal_gives_a_conversion_that_works(tmp_path, monkeypatch):
    """A torch-pickle checkpoint is refused with a transformers one-liner; running that exact
    command gives safetensors that load with the same logits as the torch model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    src = str(tmp_path / "bin")
    hf_cfg.save_pretrained(src)
    torch.save(ref.state_dict(), os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ValueError) as e:
        models.from_pretrained(src)
    msg = str(e.value)
    assert "allow_pickle" not in msg and "pytorch_model.bin" in msg
    (command,) = [line.strip() for line in msg.splitlines() if line.strip().startswith("python -c")]
    python, flag, code, *args = shlex.split(command)
    assert (python, flag) == ("python", "-c")
    monkeypatch.setattr(sys, "argv", ["-c", *args])
    exec(code, {})  # what `python -c` runs (in this process: no second transformers import)
    converted = models.from_pretrained(f"{src}-safetensors")
    ids = np.array([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(converted(jnp.asarray(ids))), want, rtol=1e-4, atol=1e-5)


# ==============================================================================================
# Checkpoints: fingerprint.
# ==============================================================================================
def numpy_fingerprint(x: np.ndarray) -> int:
    """``sum_i bits_i * (2 i + 1) mod 2**32`` with a plain Python loop over the row-major elements."""
    x = np.ascontiguousarray(x)
    raw = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}")
    total = 0
    for i, v in enumerate(raw.ravel().tolist()):
        total = (total + int(v) * (2 * i + 1)) % 2**32
    return total


def test_fingerprint_matches_a_python_loop():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": rng.normal(size=(7,)).astype(jnp.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(2, 3, 4), dtype=np.int32),
        "u32": rng.integers(0, 2**32 - 1, size=(4,), dtype=np.uint32),
        "flag": np.array([True, False, True]),
        "scalar": np.array(-3.5, np.float32),
    }
    got = checkpoint.fingerprint(jax.tree.map(jnp.asarray, tree))
    assert got == {k: numpy_fingerprint(v) for k, v in tree.items()}


def test_fingerprint_is_sharding_independent_and_sees_one_changed_bit():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    assert checkpoint.fingerprint({"x": sharded}) == checkpoint.fingerprint({"x": jnp.asarray(x)})
    y = x.copy()
    y.view(np.uint32)[5, 4] ^= 1  # one mantissa bit
    assert checkpoint.fingerprint({"x": jnp.asarray(y)}) != checkpoint.fingerprint({"x": jnp.asarray(x)})


# ==============================================================================================
# Checkpoints: restore fallback.
# ==============================================================================================
def ckpt_cfg(keep=5, async_save=False):
    return ml_collections.ConfigDict(dict(every=1, keep=keep, async_save=async_save))


def values_at(step: int) -> dict:
    """The state saved at ``step``, built in numpy (the expected values of a restore)."""
    return {
        "params": {"w": (np.arange(600, dtype=np.float32).reshape(20, 30) * 0.5 + step)},
        "count": np.array(step, np.int32),
        "rng": np.array([step, 7], np.uint32),
    }


def abstract():
    from jax.sharding import SingleDeviceSharding

    s = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values_at(0))


def write_steps(workdir, steps=(1, 2, 3), *, async_save=False, keep=5, side=None):
    manager = checkpoint.make_manager(str(workdir), ckpt_cfg(keep, async_save))
    for s in steps:
        extra = side(s) if side else {"data": {"epoch": 0, "position": s}}
        checkpoint.save(manager, s, jax.tree.map(jnp.asarray, values_at(s)), extra, force=True)
    manager.wait_until_finished()
    return os.path.join(str(workdir), "checkpoints")


def assert_restored(result, step):
    assert result is not None and result[0] == step
    got = jax.device_get(result[1])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(values_at(step)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert result[2] == {"data": {"epoch": 0, "position": step}}


def restore_fresh(workdir, **kw):
    manager = checkpoint.make_manager(str(workdir), ckpt_cfg())
    return checkpoint.restore(manager, abstract(), **kw), manager


def largest_chunk(step_dir: str) -> str:
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def flip(path: str, start: int, n: int = 16) -> None:
    with open(path, "rb") as f:
        b = bytearray(f.read())
    for i in range(start, min(start + n, len(b))):
        b[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(b))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_clean_restore_is_bit_exact_and_fresh_dir_is_none(tmp_path):
    assert restore_fresh(tmp_path / "empty")[0] is None
    write_steps(tmp_path, async_save=True)
    assert_restored(restore_fresh(tmp_path)[0], 3)


@pytest.mark.parametrize(
    "corrupt,expect",
    [
        ("truncate", r"OUT_OF_RANGE.*Requested byte range"),
        ("zstd_header", r"ZSTD_decompressStream\(\) failed"),
        # which array's chunk sits mid-file depends on tensorstore's packing order: any one is fine
        ("chunk_middle", r"differ from the saved fingerprint in 1 array\(s\) \(\w+/"),
        ("side_deleted", r"side/metadata"),
        ("side_garbage", r"JSONDecodeError"),
    ],
)
def test_corrupt_newest_falls_back_to_the_intact_one(corrupt, expect, tmp_path, caplog):
    directory = write_steps(tmp_path)
    newest = os.path.join(directory, "3")
    if corrupt == "truncate":
        chunk = largest_chunk(newest)
        os.truncate(chunk, os.path.getsize(chunk) // 2)
    elif corrupt == "zstd_header":
        flip(largest_chunk(newest), 0)
    elif corrupt == "chunk_middle":  # tensorstore's zstd frames have no checksum: silent without ours
        chunk = largest_chunk(newest)
        flip(chunk, os.path.getsize(chunk) // 2)
    elif corrupt == "side_deleted":
        os.remove(os.path.join(newest, "side", "metadata"))
    else:
        with open(os.path.join(newest, "side", "metadata"), "w") as f:
            f.write("{not json")
    with caplog.at_level(logging.WARNING):
        restored, manager = restore_fresh(tmp_path)
    assert_restored(restored, 2)
    (line,) = [w for w in warnings_of(caplog) if w.startswith("checkpoint 3 is unreadable: ")]
    assert "\n" not in line
    assert re.search(expect, line), line
    assert f"{directory}/3" in line  # the file (or the checkpoint directory holding it)
    (aside,) = checkpoint.aside_dirs(directory)
    assert re.fullmatch(r"corrupt-3-\d{8}T\d{6}", aside) and f"moved to {directory}/{aside}" in line
    assert os.path.isdir(os.path.join(directory, aside, "state"))  # kept, not deleted
    assert manager.all_steps() == [1, 2]


def test_missing_required_side_key_or_bad_side_state_falls_back(tmp_path, caplog):
    write_steps(tmp_path, steps=(1,), side=lambda s: {"data": {"position": s}, "reward_stats": {"n": 1}})
    write_steps(tmp_path, steps=(2,), side=lambda s: {"data": {"position": s}})  # no reward_stats
    write_steps(tmp_path, steps=(3,), side=lambda s: {"data": {"position": -1}, "reward_stats": {"n": 3}})

    def check_side(side):
        if side["data"]["position"] < 0:
            raise ValueError("data iterator position -1 is out of range")

    with caplog.at_level(logging.WARNING):
        restored, _ = restore_fresh(tmp_path, required_side=("data", "reward_stats"), check_side=check_side)
    assert restored[0] == 1 and restored[2] == {"data": {"position": 1}, "reward_stats": {"n": 1}}
    lines = [w for w in warnings_of(caplog) if re.match(r"checkpoint \d is unreadable", w)]
    assert "position -1 is out of range" in lines[0] and lines[0].startswith("checkpoint 3")
    assert "lacks the side state ['reward_stats']" in lines[1] and lines[1].startswith("checkpoint 2")


def test_none_restores_is_a_clear_error_also_on_the_next_rerun(tmp_path):
    directory = write_steps(tmp_path, steps=(1, 2))
    for s in (1, 2):
        os.remove(os.path.join(directory, str(s), "side", "metadata"))
    with pytest.raises(checkpoint.CheckpointRestoreError) as e:
        restore_fresh(tmp_path)
    msg = str(e.value)
    assert "no checkpoint in" in msg and "step 2:" in msg and "step 1:" in msg and "corrupt-1-" in msg
    with pytest.raises(checkpoint.CheckpointRestoreError, match="none left"):
        restore_fresh(tmp_path)  # never a silent fresh start beside the moved-aside checkpoints
    assert checkpoint.has_checkpoint(str(tmp_path))


def test_incompatible_state_is_named_and_nothing_moves(tmp_path):
    directory = write_steps(tmp_path, steps=(1,))
    manager = checkpoint.make_manager(str(tmp_path), ckpt_cfg())
    other = abstract()
    other["params"]["w"] = jax.ShapeDtypeStruct((20, 31), jnp.float32, sharding=other["count"].sharding)
    other["params"]["b"] = other["count"]
    with pytest.raises(checkpoint.IncompatibleCheckpoint) as e:
        checkpoint.restore(manager, other)
    assert "not in the checkpoint: params/b" in str(e.value)
    assert "params/w saved (20, 30) now (20, 31)" in str(e.value)
    assert checkpoint.aside_dirs(directory) == [] and checkpoint.step_dirs(directory) == [1]


def test_train_state_paths_match_orbax_metadata(tmp_path):
    """The compatibility check on a real TrainState (dataclass fields, optax namedtuples)."""
    import optax

    from jaxrlhf.trainer import state as state_lib

    params = {"embed": jnp.ones((5, 4)), "layers": {"0": {"kernel": jnp.ones((4, 3))}}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    st = state_lib.create(params, tx, rng=jax.random.key_data(jax.random.key(0)))
    manager = checkpoint.make_manager(str(tmp_path), ckpt_cfg())
    checkpoint.save(manager, 1, st, {"data": {}}, force=True)
    shardings = jax.tree.map(lambda x: x.sharding, st)
    step, restored, side = checkpoint.restore(manager, checkpoint.abstract_like(st, shardings))
    assert step == 1 and side == {"data": {}}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(st), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_moved_aside_dirs_survive_later_saves_and_cleanup(tmp_path):
    directory = write_steps(tmp_path, steps=(1, 2))
    os.remove(os.path.join(directory, "2", "side", "metadata"))
    restored, _ = restore_fresh(tmp_path)
    assert restored[0] == 1
    write_steps(tmp_path, steps=(2, 3, 4, 5), keep=2)  # max_to_keep garbage collection runs
    assert checkpoint.step_dirs(directory) == [4, 5]
    assert len(checkpoint.aside_dirs(directory)) == 1


# ==============================================================================================
# Checkpoints: failed saves.
# ==============================================================================================
FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp, ml_collections
    from jaxrlhf.trainer import checkpoint
    cfg = ml_collections.ConfigDict(dict(every=1, keep=2, async_save=sys.argv[2] == "async"))
    manager = checkpoint.make_manager(sys.argv[1], cfg)
    for s in (1, 2):
        checkpoint.save(manager, s, {"w": jnp.full((4,), float(s))}, {"data": {"s": s}}, force=True)
    manager.wait_until_finished()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # Python ignores SIGXFSZ: EFBIG
    big = {"w": jax.random.normal(jax.random.key(0), (400_000,))}
    try:
        checkpoint.save(manager, 3, big, {"data": {"s": 3}}, force=True)
        manager.wait_until_finished()
    except checkpoint.CheckpointSaveError as e:
        print("SAVE ERROR:", e)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_save_hitting_the_file_size_limit_keeps_earlier_checkpoints(mode, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path), mode], capture_output=True, text=True, env=env
    )
    assert out.returncode == 3, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("SAVE ERROR:")]
    assert "saving step 3" in line and "File too large" in line and "(steps: 1, 2)" in line, line
    directory = os.path.join(str(tmp_path), "checkpoints")
    assert checkpoint.step_dirs(directory) == [1, 2]
    manager = checkpoint.make_manager(str(tmp_path), ckpt_cfg())
    abstract_w = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=abstract()["count"].sharding)}
    step, state, side = checkpoint.restore(manager, abstract_w)  # the partial write is ignored
    assert step == 2 and side == {"data": {"s": 2}}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), 2.0, np.float32))
    checkpoint.save(manager, 3, state, side, force=True)  # the rerun saves again; the leftover is gone
    manager.wait_until_finished()
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_disk_full_on_a_side_write_raises_and_keeps_earlier(tmp_path, monkeypatch):
    import errno

    from etils import epath

    directory = write_steps(tmp_path, steps=(1, 2), keep=2)
    manager = checkpoint.make_manager(str(tmp_path), ckpt_cfg(keep=2))

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(epath.Path, "write_text", full)
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"saving step 3 .*No space left on device"):
        checkpoint.save(manager, 3, jax.tree.map(jnp.asarray, values_at(3)), {"data": {}}, force=True)
    monkeypatch.undo()
    assert checkpoint.step_dirs(directory) == [1, 2]
    assert_restored(restore_fresh(tmp_path)[0], 2)


# ==============================================================================================
# The divergence guard on the loss (jaxrlhf/trainer/guard.py).
# ==============================================================================================
def _linear_run(batches, **guard):
    """Adam on ``w [4]`` with the loss ``mean((x @ w - y)^2) - 5`` (negative once fitted, as PPO's
    can be) over ``batches``; returns the final state and each step's metrics."""
    from jaxrlhf.trainer import guard as guard_lib
    from jaxrlhf.trainer import state as state_lib
    from jaxrlhf.trainer.step import make_train_step

    tx = optax.adam(0.05)

    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, denoms, rng
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2) - 5.0 + batch["shift"], {}

    kwargs = {f"guard_{k}": v for k, v in guard.items()}
    step = jax.jit(make_train_step(loss_fn, lambda b: {}, tx, **kwargs))
    st = state_lib.create({"w": jnp.zeros(4, jnp.float32)}, tx, rng=jax.random.key(0))
    st = st.replace(guard=guard_lib.init_stats(guard_lib.Guard(**guard)) if guard else None)
    history = []
    for b in batches:
        st, m = step(st, b)
        history.append(jax.device_get(m))
    return st, history


def _batches(n, spike_at, shift):
    rng = np.random.default_rng(0)
    w_true = np.array([0.1, -0.2, 0.05, 0.3], np.float32)
    out = []
    for i in range(n):
        x = rng.normal(size=(64, 4)).astype(np.float32)
        y = x @ w_true + 0.1 * rng.normal(size=64).astype(np.float32)
        out.append({"x": x, "y": y, "shift": np.float32(shift if i == spike_at else 0.0)})
    return out


def _numpy_loss_verdicts(losses, applied_mask, factor, warmup, decay):
    """The loss criterion replayed in numpy over the logged losses: ``|L - m| > factor * max(d, 1e-6 |m|)``
    after ``warmup`` applied steps; ``m``, ``d`` EMAs of the applied losses and their deviations."""
    m = d = 0.0
    count, verdicts = 0, []
    for loss, _ in zip(losses, applied_mask, strict=True):
        spike = count >= warmup and abs(loss - m) > factor * max(d, 1e-6 * abs(m))
        verdicts.append(spike)
        if not spike:
            dev = abs(loss - m) if count > 0 else 0.0
            d = dev if count <= 1 else decay * d + (1 - decay) * dev
            m = loss if count == 0 else decay * m + (1 - decay) * loss
            count += 1
    return verdicts, m, d, count


@pytest.mark.parametrize("shift", [40.0, -40.0])
def test_loss_guard_skips_a_loss_spike_like_a_batch_never_applied(shift):
    """A loss spike (the loss shifted by a constant at step 6: the gradient is unchanged, so only
    the loss criterion can see it) is skipped: the final parameters and optimizer state equal a
    run without the guard in which that batch never came; the verdicts equal a numpy replay."""
    spike_at, guard = 6, dict(factor=0.0, warmup=3, decay=0.8, loss_factor=6.0)
    batches = _batches(12, spike_at, shift)
    guarded, history = _linear_run(batches, **guard)
    never, _ = _linear_run(batches[:spike_at] + batches[spike_at + 1 :])
    for a, b in zip(
        jax.tree.leaves((guarded.params, guarded.opt_state)),
        jax.tree.leaves((never.params, never.opt_state)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert int(guarded.skipped) == 1 and int(guarded.consecutive_skips) == 0
    flagged = [int(h["guard_loss_spike"]) for h in history]
    assert flagged == [int(i == spike_at) for i in range(12)]
    assert [int(h["guard_spike"]) for h in history] == flagged
    losses = [float(h["loss"]) for h in history]
    assert min(losses) < 0  # the criterion works on negative losses
    verdicts, m, d, count = _numpy_loss_verdicts(losses, flagged, 6.0, 3, 0.8)
    assert [int(v) for v in verdicts] == flagged
    np.testing.assert_allclose(float(guarded.guard["loss"]), m, rtol=1e-5)
    np.testing.assert_allclose(float(guarded.guard["loss_dev"]), d, rtol=1e-5)
    assert float(guarded.guard["count"]) == count == 11


def test_loss_guard_off_by_default_adds_no_state():
    from jaxrlhf import config_defaults
    from jaxrlhf.trainer import guard as guard_lib

    g = guard_lib.Guard.from_config(config_defaults.base("sft").guard)
    assert not g.enabled and guard_lib.init_stats(g) is None
    assert sorted(guard_lib.init_stats(guard_lib.Guard(factor=2.0))) == ["count", "grad_norm"]  # as before
    old = ml_collections.ConfigDict(
        dict(factor=2.0, warmup=10, decay=0.9)
    )  # a config from before loss_factor
    assert guard_lib.Guard.from_config(old).loss_factor == 0.0


def test_a_config_json_without_new_guard_keys_still_resumes(tmp_path):
    """A run saved before guard.loss_factor existed (its config.json lacks the key) resumes."""
    import json

    from jaxrlhf import config_defaults, config_utils
    from jaxrlhf.trainer import harness

    c = config_defaults.base("sft")
    saved = json.loads(config_utils.to_json(c))
    del saved["guard"]["loss_factor"]
    del saved["distributed"]
    assert config_utils.incompatible_keys(saved, c)  # without the harness's filling it would refuse
    assert (
        config_utils.incompatible_keys(harness._with_added_keys(saved), c, harness.COMMON_RESUMABLE_KEYS)
        == []
    )


def test_loss_guard_stops_a_run_on_a_loss_spike_naming_step_values_and_checkpoint(tmp_path, monkeypatch):
    """The SFT loss shifted by +100 at step 5 (its gradient unchanged: the gradient-norm guard is off
    and could not see it anyway): with the loss guard on and max_consecutive_skips=1 the run stops
    naming step 5 and the values, and the newest checkpoint is step 4's."""
    import dataclasses

    from jaxrlhf import registry
    from jaxrlhf.trainer import harness

    monkeypatch.chdir(ROOT)
    sft = registry.get("sft")

    def shifted_build(config, graphdef):
        loss_fn, den = sft.build_loss(config, graphdef)

        def shifted(params, ref_params, batch, denoms, rng):
            loss, metrics = loss_fn(params, ref_params, batch, denoms, rng)
            return loss + jnp.where(denoms["step"] == 4, 100.0, 0.0), metrics  # state.step 4 = step 5

        return shifted, den

    monkeypatch.setitem(registry.REGISTRY, "sft", dataclasses.replace(sft, build_loss=shifted_build))
    spec = importlib.util.spec_from_file_location("tiny_sft", os.path.join(ROOT, "configs/tiny/sft.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    with c.unlocked():
        c.total_steps, c.log_every, c.max_consecutive_skips = 8, 1, 1
        c.checkpoint.every, c.checkpoint.async_save = 1, False
        c.guard = dict(factor=0.0, warmup=3, decay=0.9, loss_factor=100.0)
    with pytest.raises(harness.TooManySkips) as err:
        registry.run(c, str(tmp_path / "spike"))
    text = str(err.value)
    assert "sft step 5: 1 consecutive steps" in text
    loss = float(re.search(r"loss=([-\d.e+]+)", text).group(1))
    assert 100 < loss < 110  # the shifted loss, as logged
    assert "guard_loss_spike=1" in text and "loss mean" in text and "newest: step 4" in text
    steps = sorted(int(d) for d in os.listdir(tmp_path / "spike" / "checkpoints") if d.isdigit())
    assert steps[-1] == 4


# ==============================================================================================
# A lost peer process (jaxrlhf/distributed.py; the two-process runs: tests/test_multiprocess_faults.py).
# ==============================================================================================
class _Store:
    """JAX's key-value client as PeerWatch uses it, in a dict; ``down`` makes every call fail."""

    def __init__(self):
        self.kv, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        assert allow_overwrite or key not in self.kv
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def test_peer_watch_verdicts_at_given_times():
    """``_check`` on explicit store contents and clock values: a moving beat is alive, a beat
    unchanged for longer than the timeout is a lost peer, ``finished`` stops the watch on it,
    ``failed: ...`` is reported with the peer's error."""
    from jaxrlhf import distributed

    w = distributed.PeerWatch(_Store(), 0, 3, timeout=10.0, on_lost=None)
    key = lambda p: f"jaxrlhf/alive/{p}"  # noqa: E731
    seen = {1: (None, 0.0), 2: (None, 0.0)}
    assert w._check({key(1): "1", key(2): "1"}, seen, 1.0) is None
    assert w._check({key(1): "2", key(2): "1"}, seen, 10.5) is None  # 2's beat is 9.5 s old
    cause = w._check({key(1): "3", key(2): "1"}, seen, 11.5)  # 10.5 s
    assert cause.startswith("process 2 sent no heartbeat for 10 s") and "killed" in cause
    seen = {1: (None, 0.0)}
    assert w._check({key(1): "finished"}, seen, 5.0) is None and seen == {}
    assert w._check({}, seen, 100.0) is None  # a finished peer is no longer watched
    w.timeout = 0.01  # the grace before reporting a failed peer is min(5 s, timeout)
    cause = w._check({key(1): "failed: TooManySkips: step 5"}, {1: (None, 0.0)}, 1.0)
    assert cause == "process 1 failed: TooManySkips: step 5"


def test_peer_watch_reports_a_silent_store_and_the_message_says_how_to_resume():
    """The store stops answering (process 0, which runs it, is gone): after the timeout the watch
    reports it; the message names the cause, the exit code and the checkpoint a rerun resumes from."""
    import threading
    import time

    from jaxrlhf import distributed

    store, lost = _Store(), []
    got = threading.Event()
    w = distributed.PeerWatch(store, 1, 2, timeout=0.5, on_lost=lambda c: (lost.append(c), got.set()))
    w.start()
    time.sleep(0.3)
    assert store.kv["jaxrlhf/alive/1"] != "" and not lost  # beating
    store.kv["jaxrlhf/alive/0"] = "finished"  # process 0 ended normally: not a lost peer
    store.down = True
    assert got.wait(30), "the watch never reported the silent store"
    assert lost[0].startswith("the coordination service stopped answering for 0.5 s")
    distributed.note_checkpoint("/runs/x", 4)
    text = distributed.runtime_failed_message(lost[0])
    assert "the distributed runtime failed: the coordination service stopped answering" in text
    assert f"exit {distributed.PEER_LOST_EXIT_CODE}" in text
    assert "Rerun the same command on every process: the run resumes from the last checkpoint in " in text
    assert "/runs/x (step 4)." in text
    distributed.note_checkpoint(None, None)
    w2 = distributed.PeerWatch(_Store(), 0, 2, timeout=0.5, on_lost=lost.append)
    w2.start()
    w2.finish()  # a normal end: the thread stops, the store says finished, nothing is reported
    w2.join(5)
    assert not w2.is_alive() and w2.client.kv["jaxrlhf/alive/0"] == "finished" and len(lost) == 1
