"""``python -m jaxrlhf.bench.vocab``: the rows it writes, timed and untimed, on a tiny vocabulary.

The timed path runs real donated steps (policy and reference must be separate buffers: donating one
buffer twice is an error), and whether a row is timed depends on the load when the command starts,
not on the load its own compiles cause."""

from __future__ import annotations

import argparse
import math

from jaxrlhf.bench import vocab


def _args(**kw):
    base = dict(layers=1, pairs=1, seq=32, time=True, steps=1)
    return argparse.Namespace(**{**base, **kw})


def test_row_is_timed_when_the_machine_was_idle_at_start():
    r = vocab.row(300, 128, _args(), start_load=0.2)
    assert r["vocab"] == 300 and r["vocab_chunk"] == 128
    assert r["logits_f32_bytes"] == 2 * 1 * 32 * 300 * 4
    assert r["peak_bytes"] == r["args_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert math.isfinite(r["step_s"]) and r["step_s"] > 0


def test_row_is_not_timed_on_a_loaded_machine_or_without_time():
    r = vocab.row(300, 0, _args(), start_load=3.5)
    assert r["step_s"] is None and r["not_timed"] == "machine loaded (load average 3.5)"
    r = vocab.row(300, 0, _args(time=False), start_load=0.0)
    assert r["step_s"] is None and r["not_timed"] == "not requested"
