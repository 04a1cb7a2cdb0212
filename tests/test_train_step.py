"""The functional core: accumulation == full batch, sharded == single device, NaN skip, in-step EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import models, registry
from jaxrlhf.sharding import make_mesh, shard_batch
from jaxrlhf.trainer import setup
from jaxrlhf.trainer.optim import make_optimizer
from jaxrlhf.trainer.step import make_train_step, split_micro_batches

V, T, B = 64, 12, 8


def _config(algorithm, **mesh):
    c = d.base(algorithm)
    c.model = d.model(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    c.model.dtype = "float32"
    c.mesh = dict(data=1, fsdp=1, tensor=1, **mesh) if mesh else dict(data=1, fsdp=1, tensor=1)
    # SGD: the update is linear in the gradient, so equal updates mean equal gradients (Adam divides
    # near-zero gradients by their own magnitude and turns float noise into visible differences).
    c.optim = d.optim(name="sgd", lr=1e-1, b1=0.0, warmup_steps=0, schedule="constant")
    c.ref = d.ref(ema_decay=0.9)
    c.dpo = dict(beta=0.1, label_smoothing=0.1, loss_type="sigmoid", nll_coef=0.5)
    return c


def _seq(rng, b=B, t=T, left=False):
    """Variable-length rows, right (or left) padded, with a prompt/response split."""
    ids = rng.integers(3, V, size=(b, t)).astype(np.int32)
    am = np.zeros((b, t), np.int32)
    lm = np.zeros((b, t), np.int32)
    for i in range(b):
        n = rng.integers(5, t + 1)
        p = rng.integers(1, n - 1)
        sl = slice(t - n, t) if left else slice(0, n)
        am[i, sl] = 1
        lm[i, sl] = 1
        start = sl.start
        lm[i, start : start + p] = 0
    pos = np.maximum(np.cumsum(am, 1) - 1, 0) * am
    ids = np.where(am > 0, ids, 0)
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "positions": pos.astype(np.int32)}


def _pref_batch(seed=0):
    rng = np.random.default_rng(seed)
    c, r = _seq(rng), _seq(rng)
    out = {f"chosen_{k}": v for k, v in c.items()}
    out.update({f"rejected_{k}": v for k, v in r.items()})
    out["margin"] = rng.normal(size=(B,)).astype(np.float32)
    return out


def _run_one_step(config, batch, micro_batches=1, steps=1):
    mesh = make_mesh(config.mesh)
    algorithm = registry.get(config.algorithm)
    graphdef, params, _ = setup.load_model(config, config.model, mesh, head=algorithm.head)
    loss_fn, denoms = algorithm.build_loss(config, graphdef)
    uses_ref = algorithm.uses_reference
    tx, _ = make_optimizer(config.optim, 10)
    step_fn = make_train_step(
        loss_fn,
        denoms,
        tx,
        num_micro_batches=micro_batches,
        ema_decay=config.ref.ema_decay if uses_ref else 1.0,
    )
    ref_of = setup.whole if uses_ref else setup.no_reference
    state, shardings = setup.make_state(tx, params, mesh, ref_of=ref_of, seed=0)
    step = setup.jit_step(step_fn, shardings, mesh)
    for _ in range(steps):
        state, metrics = step(state, shard_batch(mesh, batch))
    return jax.device_get(state), jax.device_get(metrics), shardings


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_split_micro_batches_interleaves_rows():
    x = {"a": jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)}
    mb = split_micro_batches(x, 4)["a"]
    assert mb.shape == (4, 2, 3)
    np.testing.assert_array_equal(mb[1, :, 0], [1, 5])
    with pytest.raises(ValueError, match="not divisible"):
        split_micro_batches({"a": jnp.zeros((6, 2))}, 4)


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_accumulation_equals_full_batch(algorithm):
    config = _config(algorithm)
    batch = _seq(np.random.default_rng(1)) if algorithm == "sft" else _pref_batch(1)
    full, m_full, _ = _run_one_step(config, batch, micro_batches=1)
    acc, m_acc, _ = _run_one_step(config, batch, micro_batches=4)
    _assert_trees_close(full.params, acc.params)
    _assert_trees_close(full.ref_params, acc.ref_params)
    for k in m_full:
        np.testing.assert_allclose(m_full[k], m_acc[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # The global token mean is not the mean of per-micro-batch means: rows have different lengths.
    assert m_full["loss"] > 0


@pytest.fixture(scope="module")
def single_device_dpo():
    return _run_one_step(_config("dpo"), _pref_batch(2))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_matches_single_device(mesh, single_device_dpo):
    batch = _pref_batch(2)
    single, m_single, _ = single_device_dpo
    config = _config("dpo")
    config.mesh = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    sharded, m_sharded, shardings = _run_one_step(config, batch)
    _assert_trees_close(single.params, sharded.params)
    _assert_trees_close(single.opt_state, sharded.opt_state)
    _assert_trees_close(single.ref_params, sharded.ref_params)
    np.testing.assert_allclose(m_single["loss"], m_sharded["loss"], rtol=1e-5)
    # The layout is the rules' layout: with fsdp/tensor > 1 some parameter is really split.
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    if mesh[1] > 1 or mesh[2] > 1:
        assert any(any(ax is not None for ax in spec) for spec in specs)


def test_reward_step_margin_and_accuracy():
    """A step's logged Bradley-Terry metrics equal NumPy on the scalar head's output at each half's
    last real token (right padding), with the margin column subtracted (use_margin)."""
    config = _config("reward")
    config.bradley_terry = d.bradley_terry(use_margin=True)
    batch = _pref_batch(3)
    graphdef, params, _ = setup.load_model(config, config.model, make_mesh(config.mesh), head="scalar")
    model = nnx.merge(graphdef, params)

    def last_scores(half):
        am = batch[f"{half}_attention_mask"]
        out = np.asarray(
            model(
                jnp.asarray(batch[f"{half}_input_ids"]),
                attention_mask=jnp.asarray(am),
                positions=jnp.asarray(batch[f"{half}_positions"]),
            ),
            np.float64,
        )
        return out[np.arange(B), [np.nonzero(row)[0][-1] for row in am]]

    rc, rr, m = last_scores("chosen"), last_scores("rejected"), batch["margin"].astype(np.float64)
    state, metrics, _ = _run_one_step(config, batch, steps=1)  # metrics of the initial parameters
    assert state.ref_params is None
    assert 0.0 < np.mean(rc > rr) < 1.0  # the batch has both orders
    np.testing.assert_allclose(metrics["bt_loss"], np.mean(np.logaddexp(0.0, -(rc - rr - m))), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr))
    np.testing.assert_allclose(metrics["margin"], np.mean(rc - rr), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_chosen"], np.mean(rc), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_rejected"], np.mean(rr), rtol=1e-4, atol=1e-6)


def _toy_step(ema_decay=1.0, reset_every=0):
    """A step on a 2-parameter model whose loss is NaN when the batch says so."""

    def loss_fn(params, ref_params, batch, denoms, rng):
        loss = jnp.sum((params["w"] - batch["target"]) ** 2) * batch["scale"][0] / denoms["n"]
        return loss, {"w_mean": jnp.mean(params["w"])}

    tx = optax.adam(0.1)
    step = make_train_step(
        loss_fn, lambda b: {"n": jnp.float32(1.0)}, tx, ema_decay=ema_decay, ref_reset_every=reset_every
    )
    from jaxrlhf.trainer import state as state_lib

    params = {"w": jnp.array([1.0, -2.0])}
    state = state_lib.create(params, tx, ref_params=jax.tree.map(jnp.copy, params), rng=jax.random.key(0))
    return jax.jit(step), state


def test_non_finite_step_is_skipped_and_counted():
    step, state = _toy_step(ema_decay=0.5)
    good = {"target": jnp.zeros((1, 2)), "scale": jnp.ones((1,))}
    bad = {"target": jnp.zeros((1, 2)), "scale": jnp.full((1,), jnp.nan)}
    s1, m1 = step(state, good)
    assert int(m1["skipped"]) == 0 and int(s1.consecutive_skips) == 0
    s2, m2 = step(s1, bad)
    assert int(m2["skipped"]) == 1
    for a, b in zip(
        jax.tree.leaves((s1.params, s1.opt_state, s1.ref_params)),
        jax.tree.leaves((s2.params, s2.opt_state, s2.ref_params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    s3, _ = step(s2, bad)
    assert int(s3.skipped) == 2 and int(s3.consecutive_skips) == 2 and int(s3.step) == 3
    s4, _ = step(s3, good)
    assert int(s4.consecutive_skips) == 0 and int(s4.skipped) == 2
    assert np.all(np.isfinite(np.asarray(s4.params["w"])))


def test_ema_reference_updated_inside_the_step():
    step, state = _toy_step(ema_decay=0.75)
    batch = {"target": jnp.zeros((1, 2)), "scale": jnp.ones((1,))}
    new, _ = step(state, batch)
    expected = 0.75 * state.ref_params["w"] + 0.25 * new.params["w"]
    np.testing.assert_allclose(new.ref_params["w"], expected, rtol=1e-6)
    frozen_step, frozen = _toy_step(ema_decay=1.0)
    f1, _ = frozen_step(frozen, batch)
    np.testing.assert_array_equal(f1.ref_params["w"], frozen.ref_params["w"])


def test_reference_hard_reset_every_n_steps():
    step, state = _toy_step(ema_decay=1.0, reset_every=2)
    batch = {"target": jnp.zeros((1, 2)), "scale": jnp.ones((1,))}
    s1, _ = step(state, batch)
    np.testing.assert_array_equal(s1.ref_params["w"], state.ref_params["w"])
    s2, _ = step(s1, batch)
    np.testing.assert_array_equal(s2.ref_params["w"], s2.params["w"])


def test_step_traces_once_for_a_repeated_shape():
    config = _config("sft")
    mesh = make_mesh(config.mesh)
    graphdef, params, _ = setup.load_model(config, config.model, mesh)
    loss_fn, denoms = registry.get("sft").build_loss(config, graphdef)
    tx, _ = make_optimizer(config.optim, 10)
    traces = []

    def counted(state, batch):
        traces.append(1)
        return make_train_step(loss_fn, denoms, tx)(state, batch)

    state, shardings = setup.make_state(tx, params, mesh, seed=0)
    step = setup.jit_step(counted, shardings, mesh)
    rng = np.random.default_rng(0)
    for _ in range(3):
        state, _ = step(state, shard_batch(mesh, _seq(rng)))
    assert len(traces) == 1 and len(step.executables) == 1
    assert step.memory.get("argument_size_in_bytes", 0) > 0


def test_opt_state_sharded_like_params():
    config = _config("sft")
    config.mesh = dict(data=2, fsdp=4, tensor=1)
    config.optim = d.optim(name="adamw")
    mesh = make_mesh(config.mesh)
    _, params, _ = setup.load_model(config, config.model, mesh)
    tx, _ = make_optimizer(config.optim, 10)
    _, sh = setup.make_state(tx, params, mesh, seed=0)
    by_path = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh.params)}
    moments = [
        (jax.tree_util.keystr(p), s.spec)
        for p, s in jax.tree_util.tree_leaves_with_path(sh.opt_state)
        if ".mu" in jax.tree_util.keystr(p) or ".nu" in jax.tree_util.keystr(p)
    ]
    assert len(moments) == 2 * len(by_path)
    for path, spec in moments:
        param_path = [k for k in by_path if path.endswith(k)]
        assert len(param_path) == 1, path
        assert spec == by_path[param_path[0]], path
    assert any(spec != jax.sharding.PartitionSpec() for _, spec in moments)


def test_params_created_sharded_not_replicated():
    config = _config("sft")
    config.mesh = dict(data=1, fsdp=8, tensor=1)
    mesh = make_mesh(config.mesh)
    _, params, _ = setup.load_model(config, config.model, mesh)
    embed = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if "embed" in jax.tree_util.keystr(p)][
        0
    ]
    assert embed.sharding.spec != jax.sharding.PartitionSpec()
    shard_rows = {s.data.shape for s in embed.addressable_shards}
    assert all(shape[0] * 8 == embed.shape[0] or shape[1] * 8 == embed.shape[1] for shape in shard_rows)


def test_nnx_module_round_trip_of_pure_params():
    model = models.init(
        "llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
    )
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    out = nnx.merge(graphdef, pure)(jnp.ones((1, 4), jnp.int32))
    assert out.shape == (1, 4, V)


# ------------------------------------------------------------------ packed preference batches
def _pref_dataset(n=8, seed=3, max_length=T, longest=8):
    """A ``PreferenceDataset`` of ``n`` random pairs (prompt 1-4 tokens, sequences <= ``longest``)."""
    from jaxrlhf.data.tokenize import PreferenceDataset

    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        p = int(rng.integers(1, 5))
        prompts.append(rng.integers(3, V, p).astype(np.int32))
        chosen.append(rng.integers(3, V, int(rng.integers(1, longest - p + 1))).astype(np.int32))
        rejected.append(rng.integers(3, V, int(rng.integers(1, longest - p + 1))).astype(np.int32))
    return PreferenceDataset(
        prompts, chosen, rejected, rng.normal(size=n).astype(np.float32),
        schema="preference", source_index=np.arange(n), pad_id=0, eos_id=2, max_length=max_length,
        max_prompt_length=4, drop_stats=None, edit_stats=None,
    )  # fmt: skip


def test_collate_packed_layout():
    ds = _pref_dataset()
    idx = list(range(8))
    packed = ds.collate_packed(idx, T, 0, micro_batches=2, row_multiple=4)
    R = packed["input_ids"].shape[0]
    assert R % 4 == 0 and R < 16  # fewer rows than the 2 B unpacked sequences
    per = R // 2
    for j, i in enumerate(idx):
        for half in ("chosen", "rejected"):
            k = int(packed[f"{half}_index"][j])
            local, s = divmod(k, T)
            row = local * 2 + j % 2  # micro-batch j % 2 holds rows r with r % 2 == j % 2
            assert local < per
            seg = packed["segment_ids"][row] == s + 1
            ids, pl = ds.sequence(i, half)
            np.testing.assert_array_equal(packed["input_ids"][row][seg], ids)
            np.testing.assert_array_equal(packed["positions"][row][seg], np.arange(len(ids)))
            np.testing.assert_array_equal(packed["loss_mask"][row][seg], np.arange(len(ids)) >= max(pl, 1))
    np.testing.assert_array_equal(packed["margin"], ds.margin)
    unpacked = ds.collate(idx, T, 0)
    assert packed["chosen_response_tokens"].sum() == unpacked["chosen_loss_mask"][:, 1:].sum()
    assert (
        packed["attention_mask"].sum()
        == unpacked["chosen_attention_mask"].sum() + unpacked["rejected_attention_mask"].sum()
    )
    # A -1 (fill) pair points at the unused slot and adds no tokens.
    fill = ds.collate_packed(idx[:7] + [-1], T, 0)
    assert fill["chosen_index"][7] == fill["rejected_index"][7] == fill["input_ids"].shape[0] * T
    assert fill["chosen_response_tokens"][7] == 0 and fill["margin"][7] == 0


@pytest.mark.parametrize("algorithm", ["dpo", "reward"])
def test_packed_pairs_equal_unpacked(algorithm):
    """Packing the sequences of a preference batch changes no number: one step on the packed batch
    (whole, or packed per micro-batch and accumulated) == one step on the padded batch."""
    ds, idx = _pref_dataset(), list(range(8))
    config = _config(algorithm)
    config.reward = dict(use_margin=True)
    ref, m_ref, _ = _run_one_step(config, ds.collate(idx, T, 0))
    for micro in (1, 4):
        packed = ds.collate_packed(idx, T, 0, micro_batches=micro)
        got, m_got, _ = _run_one_step(config, packed, micro_batches=micro)
        _assert_trees_close(ref.params, got.params)
        for k in m_ref:
            np.testing.assert_allclose(m_ref[k], m_got[k], rtol=2e-5, atol=2e-6, err_msg=f"{k} micro={micro}")
    assert np.isfinite(m_ref["loss"]) and m_ref["loss"] > 0


def test_packed_pairs_sharded_match_single_device():
    ds, idx = _pref_dataset(16, seed=5), list(range(16))
    config = _config("dpo")
    ref, m_ref, _ = _run_one_step(config, ds.collate(idx, T, 0))
    config.mesh = dict(data=4, fsdp=2, tensor=1)
    packed = ds.collate_packed(idx, T, 0, micro_batches=2, row_multiple=8)
    got, m_got, _ = _run_one_step(config, packed, micro_batches=2)
    _assert_trees_close(ref.params, got.params)
    np.testing.assert_allclose(m_ref["loss"], m_got["loss"], rtol=1e-5)


def test_batch_iterator_packs_pairs_per_process():
    """``packing=True`` on preference data: the same pairs per step as without packing, rows a
    multiple of ``row_multiple`` and ``process_count``; process slices concatenate to the global batch."""
    from jaxrlhf.data import BatchIterator

    ds = _pref_dataset(24, seed=7)
    kw = dict(shuffle=True, seed=1, micro_batches=2, row_multiple=3)
    plain = BatchIterator(ds, 8, shuffle=True, seed=1, packing=False, process_index=0, process_count=1)
    whole = BatchIterator(ds, 8, packing=True, process_index=0, process_count=1, **kw)
    parts = [BatchIterator(ds, 8, packing=True, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(4):
        a, w = next(plain), next(whole)
        got = [next(it) for it in parts]
        assert w["input_ids"].shape[0] % 6 == 0 and w["input_ids"].shape[1] == ds.max_length
        np.testing.assert_array_equal(w["margin"], a["margin"])  # the same pairs, in the same order
        for k in w:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), w[k], err_msg=k)
        assert 0.0 <= whole.last_padding_fraction < 1.0
    with pytest.raises(ValueError, match="micro_batches"):
        BatchIterator(ds, 8, packing=True, micro_batches=3, process_index=0, process_count=1)


def test_divergence_guard_skips_a_gradient_spike_after_warmup():
    """A step whose gradient norm exceeds factor x the running mean (after warmup) leaves the state
    untouched and is counted; the running mean follows an EMA of the applied steps (numpy)."""
    from jaxrlhf.trainer import state as state_lib

    tx = optax.sgd(0.1)
    x = np.linspace(-1, 1, 8).astype(np.float32)

    def loss_fn(params, ref_params, batch, denoms, rng):
        del ref_params, denoms, rng
        return jnp.mean((params["w"] * batch["x"] - batch["y"]) ** 2), {}

    step = jax.jit(
        make_train_step(loss_fn, lambda b: {}, tx, guard_factor=5.0, guard_warmup=3, guard_decay=0.5)
    )
    st = state_lib.create({"w": jnp.float32(0.0)}, tx, rng=jax.random.key(0))
    st = st.replace(guard={"count": jnp.float32(0), "grad_norm": jnp.float32(0)})
    ys = [2 * x, 2 * x, 2 * x, 2 * x, 2000 * x, 2 * x]  # the 5th batch is a spike
    w, mean, count = 0.0, 0.0, 0
    for i, y in enumerate(ys):
        before = float(st.params["w"])
        st, m = step(st, {"x": x, "y": y})
        g = abs(float(np.mean(2 * (before * x - y) * x)))  # |d loss / d w|, numpy
        spike = count >= 3 and g > 5.0 * mean
        assert int(m["guard_spike"]) == int(spike), i
        if spike:
            assert float(st.params["w"]) == before
        else:
            w = before - 0.1 * float(np.mean(2 * (before * x - y) * x))
            mean = g if count == 0 else 0.5 * mean + 0.5 * g
            count += 1
            np.testing.assert_allclose(float(st.params["w"]), w, rtol=1e-5)
        np.testing.assert_allclose(float(st.guard["grad_norm"]), mean, rtol=1e-5)
    assert int(st.skipped) == 1 and int(st.consecutive_skips) == 0
    assert i == 5 and spike is False
