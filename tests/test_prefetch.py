"""Background batch preparation (``jaxrlhf.data.prefetch``) and the host-time clock
(``jaxrlhf.trainer.perf``): same batches in the same order as a plain loop, the iterator state of the
batch consumed (not of the batches queued), errors named, clean shutdown, bit-exact resume through
the driver with prefetch on, and ``perf/host_fraction`` against a known schedule."""

import importlib.util
import os
import threading
import time

import jax
import numpy as np
import pytest

from jaxrlhf import data as data_lib
from jaxrlhf import registry
from jaxrlhf.data.prefetch import Prefetcher
from jaxrlhf.trainer.perf import StepClock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")


def load_config(relpath):
    spec = importlib.util.spec_from_file_location("cfg_prefetch", os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _iterator(**kw):
    c = load_config("configs/tiny/dpo.py")
    tok = data_lib.load_tokenizer(c.tokenizer)
    ds = data_lib.build_dataset(c.data, tok, "preference", "train")
    return data_lib.BatchIterator(ds, 2, process_index=0, process_count=1, **kw)


def _threads():
    return [t for t in threading.enumerate() if t.name in ("jaxrlhf-prefetch", "jaxrlhf-step-clock")]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_and_states_as_a_plain_loop(depth):
    """Items come out in the iterator's order; each carries the state right after its batch (a plain
    loop over a second iterator gives both), whatever the queue holds ahead."""
    plain = _iterator(packing=True, seed=3)
    expected = []
    for _ in range(7):  # crosses an epoch boundary of the fixture (a few batches per epoch)
        host = next(plain)
        expected.append((host, plain.get_state(), plain.last_padding_fraction))
    with Prefetcher(_iterator(packing=True, seed=3), lambda h: dict(h), depth) as pf:
        for host, state, pad in expected:
            item = next(pf)
            time.sleep(0.01)  # let the thread run ahead
            assert item.state == state and item.padding_fraction == pad
            assert sorted(item.host) == sorted(host)
            for k in host:
                np.testing.assert_array_equal(item.host[k], host[k])
                np.testing.assert_array_equal(item.batch[k], host[k])
    assert not _threads()


class _Failing:
    """An iterator whose third batch fails."""

    def __init__(self):
        self.n, self.last_padding_fraction = 0, 0.0

    def __next__(self):
        self.n += 1
        if self.n == 3:
            raise KeyError("bad row 17")
        return {"x": np.full(2, self.n)}

    def get_state(self):
        return {"n": self.n}


@pytest.mark.parametrize("depth", [0, 2])
def test_error_is_raised_in_the_loop_naming_the_step(depth):
    with Prefetcher(_Failing(), lambda h: h, depth, first_step=11) as pf:
        assert next(pf).state == {"n": 1} and next(pf).state == {"n": 2}
        with pytest.raises(RuntimeError, match=r"batch of step 13 failed.*bad row 17") as info:
            next(pf)
        assert isinstance(info.value.__cause__, KeyError)
    assert not _threads()


def test_stop_iteration_passes_through():
    it = _iterator(packing=False, shuffle=False, repeat=False)
    n = it.steps_per_epoch
    with Prefetcher(it, lambda h: h, 2) as pf:
        assert len(list(pf)) == n


def test_close_stops_a_thread_blocked_on_a_full_queue():
    pf = Prefetcher(_iterator(), lambda h: h, 1)
    next(pf)
    time.sleep(0.2)  # the thread has filled the queue and waits to put the next batch
    assert [t.name for t in _threads()] == ["jaxrlhf-prefetch"]
    t0 = time.perf_counter()
    pf.close()
    assert time.perf_counter() - t0 < 2.0 and not _threads()


class _FakeOutput:
    """Stands for a step's output: ready ``busy`` seconds after its device work starts, which is
    when the previous one is ready or when it was dispatched, whichever is later."""

    def __init__(self, ready_at):
        self.ready_at = ready_at

    def block_until_ready(self):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        return self


def test_host_fraction_matches_a_known_schedule():
    """Steps of 0.1 s device time with 0.1 s of host work after each (none overlapped): half the
    wall time is the host's. Then steps dispatched back to back (the host is ahead): ~0."""
    clock = StepClock()
    try:
        clock.host_fraction()  # starts the window
        for _ in range(4):
            clock.dispatched(_FakeOutput(time.perf_counter() + 0.1))
            time.sleep(0.1)  # waits for the step (as the fake takes 0.1 s) ...
            time.sleep(0.1)  # ... then 0.1 s of host work with the device idle
        assert clock.host_fraction() == pytest.approx(0.5, abs=0.15)
        t = time.perf_counter()
        for i in range(4):  # queued ahead: the device runs 0.1 s after 0.1 s, never idle
            clock.dispatched(_FakeOutput(t + 0.1 * (i + 1)))
        time.sleep(0.4)
        assert clock.host_fraction() < 0.15
    finally:
        clock.close()


def _dpo_config(total, prefetch):
    c = load_config("configs/tiny/dpo.py")
    with c.unlocked():
        c.total_steps = total
        c.checkpoint.every = 2
        c.checkpoint.async_save = False
        c.export_hf = False
        c.eval_every = 0
        c.log_every = 1
        c.optim.schedule = "constant"
        c.data.packing = True
        c.prefetch = prefetch
    return c


def test_resume_with_prefetch_is_bit_exact(tmp_path, monkeypatch):
    """Straight 5 steps with prefetch off vs 2 steps with prefetch on (the thread has prepared
    batches 3 and 4 by then) resumed to 5 (prefetch on, another depth), packed DPO: identical
    train states and losses. A checkpoint holding the iterator state of the last *prefetched*
    batch would skip batches on resume."""
    monkeypatch.chdir(ROOT)
    straight = registry.run(_dpo_config(5, 0), str(tmp_path / "a"))
    first = registry.run(_dpo_config(2, 2), str(tmp_path / "b"))
    assert first["step"] == 2
    resumed = registry.run(_dpo_config(5, 3), str(tmp_path / "b"))  # the depth may change on resume
    assert len(resumed["history"]) == 3
    a, b = jax.device_get(straight["state"]), jax.device_get(resumed["state"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        [h["loss"] for h in straight["history"][2:]], [h["loss"] for h in resumed["history"]]
    )
    h = resumed["history"][-1]
    assert 0.0 <= h["perf/host_fraction"] <= 1.0 and h["perf/data_wait_s"] >= 0.0
    assert not _threads()
