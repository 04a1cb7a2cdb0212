r"""Large vocabularies: memory (and, on an idle machine, time) of a DPO step with the plain logits path
against log-probs computed in vocabulary chunks (``config.vocab_chunk``).

    python -m jaxrlhf.bench.vocab [--vocabs=32000,128256,151936] [--chunks=0,8192] [--layers=2]
        [--pairs=4] [--seq=512] [--time] [--out=docs/results/bench_vocab.json]

The model is Qwen2.5-0.5B-shaped (hidden 896, MLP 4864, 14/2 heads, qkv bias, tied embeddings,
float32 master weights, bf16 compute) with ``--layers`` blocks and the vocabulary set to each of
``--vocabs``; the step is the whole jitted DPO train step (policy and reference forward, backward,
AdamW, donated state) on one device, compiled ahead of time from abstract shapes (nothing is
allocated). Memory = ``compiled.memory_analysis()``: step temporaries and the peak estimate
``arguments + outputs - aliased + temporaries``. With ``--time`` and an idle machine (1-minute load
average < 1.0 when the command starts) each row also runs real steps on random weights and reports
the median step time; otherwise its time says "not measured (machine loaded)".
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import config_defaults as d
from jaxrlhf import models
from jaxrlhf.algorithms import dpo
from jaxrlhf.trainer import setup
from jaxrlhf.trainer import state as state_lib
from jaxrlhf.trainer.optim import make_optimizer

QWEN05 = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_heads=14,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
)
SEQ_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions")


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def build_step(vocab: int, chunk: int, layers: int):
    """``(jitted step, abstract state, make_state)`` of the DPO train step for one row."""
    shape = dict(QWEN05, vocab_size=vocab, num_layers=layers)
    c = d.base("dpo")
    c.model = d.model(family="qwen2", **shape)
    c.vocab_chunk = chunk
    make = lambda: models.init("qwen2", dtype=jnp.bfloat16, param_dtype=jnp.float32, **shape)
    graphdef, abs_state = nnx.split(nnx.eval_shape(make))
    loss_fn, denoms = dpo.build_loss(c, graphdef)
    tx, _ = make_optimizer(c.optim, 100)
    step_fn = setup.train_step_fn(c, loss_fn, denoms, tx, ref_of=setup.whole)

    def step(s, b):
        ns, m = step_fn(s.replace(rng=jax.random.wrap_key_data(s.rng)), b)
        return ns.replace(rng=jax.random.key_data(ns.rng)), m

    def make_state(params):
        # The reference is a copy: the step donates the state, and one buffer cannot be donated twice.
        ref = jax.tree.map(jnp.copy, params)
        return state_lib.create(params, tx, ref_params=ref, rng=jax.random.key_data(jax.random.key(0)))

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = nnx.to_pure_dict(abs_state)
    abs_st = jax.eval_shape(lambda p, r: state_lib.create(p, tx, ref_params=p, rng=r), params, rng)
    return jax.jit(step, donate_argnums=0), abs_st, (make, make_state)


def abstract_batch(pairs: int, seq: int) -> dict:
    batch = {
        f"{s}_{k}": jax.ShapeDtypeStruct((pairs, seq), jnp.int32)
        for s in ("chosen", "rejected")
        for k in SEQ_KEYS
    }
    batch["margin"] = jax.ShapeDtypeStruct((pairs,), jnp.float32)
    return batch


def random_batch(pairs: int, seq: int, vocab: int, rng) -> dict:
    """Full-length rows: a 64-token prompt, then the response (loss on every response token)."""
    out = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = rng.integers(0, vocab, (pairs, seq)).astype(np.int32)
        out[f"{side}_attention_mask"] = np.ones((pairs, seq), np.int32)
        out[f"{side}_loss_mask"] = (np.arange(seq)[None] >= 64).repeat(pairs, 0).astype(np.int32)
        out[f"{side}_positions"] = np.arange(seq, dtype=np.int32)[None].repeat(pairs, 0)
    out["margin"] = np.zeros(pairs, np.float32)
    return out


def time_steps(compiled, make, make_state, batch, n: int) -> float:
    """Median seconds per step over ``n`` steps after one warm-up, on random weights."""
    params = nnx.to_pure_dict(nnx.split(make())[1])
    st = make_state(params)
    del params
    st, m = compiled(st, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        st, m = compiled(st, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def row(vocab: int, chunk: int, args, start_load: float) -> dict:
    step, abs_st, (make, make_state) = build_step(vocab, chunk, args.layers)
    t0 = time.perf_counter()
    compiled = step.lower(abs_st, abstract_batch(args.pairs, args.seq)).compile()
    mem = compiled.memory_analysis()
    out = {
        "vocab": vocab,
        "vocab_chunk": chunk,
        "compile_s": round(time.perf_counter() - t0, 1),
        "args_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "logits_f32_bytes": 2 * args.pairs * args.seq * vocab * 4,
    }
    out["peak_bytes"] = out["args_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    # The load is read once, before this process starts working: its own compiles and steps would
    # otherwise push the 1-minute average above 1.0 after the first row.
    if args.time and start_load < 1.0:
        batch = random_batch(args.pairs, args.seq, vocab, np.random.default_rng(0))
        out["step_s"] = time_steps(compiled, make, make_state, batch, args.steps)
    else:
        out["step_s"] = None
        loaded = f"machine loaded (load average {start_load:.1f})"
        out["not_timed"] = "not requested" if not args.time else loaded
    return out


def markdown(rows: list[dict], args) -> str:
    mb = lambda b: f"{b / 1e6:,.0f}"
    lines = [
        f"DPO step, Qwen2.5-0.5B shape with {args.layers} layers, {args.pairs} pairs x {args.seq} tokens, "
        "bf16 compute, float32 weights and AdamW, one CPU device; MB = 10^6 bytes.",
        "",
        "| vocabulary | vocab_chunk | [2B,T,V] f32 logits | step temporaries | peak | step time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        chunk = "0 (plain)" if r["vocab_chunk"] == 0 else f"{r['vocab_chunk']:,}"
        t = f"{r['step_s']:.2f} s" if r["step_s"] is not None else f"not measured ({r['not_timed']})"
        lines.append(
            f"| {r['vocab']:,} | {chunk} | {mb(r['logits_f32_bytes'])} MB | {mb(r['temp_bytes'])} MB "
            f"| {mb(r['peak_bytes'])} MB | {t} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocabs", default="32000,128256,151936")
    ap.add_argument("--chunks", default="0,8192", help="vocab_chunk values (0 = plain logits path)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--time", action="store_true", help="also time steps when the machine is idle")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    start_load = os.getloadavg()[0]
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for chunk in (int(c) for c in args.chunks.split(",")):
            rows.append(row(vocab, chunk, args, start_load))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            meta = {"args": vars(args), "device": str(jax.devices()[0]), "load_at_start": start_load}
            json.dump({**meta, "rows": rows}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
    return rows


if __name__ == "__main__":
    main()
