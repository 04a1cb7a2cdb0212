r"""Sample completions for a JSONL file of prompts and report prefill / decode throughput.

    python -m jaxrlhf.generate --model=DIR --prompts=prompts.jsonl --out=completions.jsonl \
        [--tokenizer=DIR] [--max_new_tokens=128] [--temperature=1.0] [--top_k=0] [--top_p=1.0] \
        [--greedy] [--batch_size=8] [--seed=0] [--dtype=float32] [--mesh=fsdp=-1 [--gen_layout]]

Each input line is a JSON object whose ``--prompt_field`` (default ``prompt``) is a string, or a
list of ``{"role", "content"}`` messages rendered with the tokenizer's chat template
(``add_generation_prompt=True``). Every output line is the input object plus ``completion``
(decoded response, special tokens skipped), ``completion_tokens`` (the stop token included),
``finish_reason`` (``"stop"`` or ``"length"``) and ``logprob`` (summed sampling log-probs).

Row ``i`` of the file is sampled with ``row_ids = i`` (see ``jaxrlhf.generation.decode``), so the
completions for a ``--seed`` do not depend on ``--batch_size`` or the mesh. Prompts are
left-padded to one width (the longest prompt) and the last batch is filled with
dummy rows, so there is one compile; the first batch is run once more untimed to compile.
Throughput: ``prefill_tok_s`` = real prompt tokens / prefill seconds; ``decode_tok_s`` =
generated tokens (stop tokens included, padding not) / decode-loop seconds. The summary is
printed as one JSON line (and written to ``--stats`` if given).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import generation, models
from jaxrlhf import sharding as shd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxrlhf.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompts", required=True, help="JSONL file, one object per line")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompt_field", default="prompt")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stop_ids", default="", help="extra comma-separated stop token ids")
    p.add_argument("--max_prompt_len", type=int, default=0, help="keep the last N prompt tokens (0 = all)")
    p.add_argument(
        "--mesh", default="", help='mesh axes, e.g. "fsdp=-1" or "data=2,tensor=4" (default: none)'
    )
    p.add_argument("--gen_layout", action="store_true", help="reshard params off fsdp for decoding")
    p.add_argument("--stats", default=None, help="also write the throughput summary JSON here")
    return p.parse_args(argv)


def read_prompts(path: str, field: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{n}: expected an object with a {field!r} field")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def encode_prompts(tokenizer, rows, field: str, max_prompt_len: int) -> list[list[int]]:
    out = []
    for n, row in enumerate(rows):
        prompt = row[field]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        elif isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            raise ValueError(f"prompt {n}: {field!r} must be a string or a list of messages")
        ids = list(ids)
        if max_prompt_len:
            ids = ids[-max_prompt_len:]
        if not ids:
            raise ValueError(f"prompt {n}: tokenizes to zero tokens; every prompt needs at least one")
        out.append(ids)
    return out


def left_pad(batch_ids: list[list[int]], width: int, rows: int, pad_id: int):
    """``[rows, width]`` left-padded ids and mask; missing rows are one-token dummies."""
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r in range(rows):
        seq = batch_ids[r] if r < len(batch_ids) else [pad_id]
        ids[r, width - len(seq) :] = seq
        mask[r, width - len(seq) :] = 1
    return ids, mask


def parse_mesh(spec: str) -> dict[str, int]:
    axes = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"--mesh: expected axis=size, got {part!r}")
        axes[name] = int(size)
    return axes


def stop_and_pad_ids(cfg, tokenizer, stop_ids: str) -> tuple[set[int], int]:
    """The stop tokens (model EOS, tokenizer EOS, ``--stop_ids``) and the padding id."""
    eos = cfg.eos_token_id
    eos_ids = set(eos if isinstance(eos, tuple) else ([] if eos is None else [eos]))
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    eos_ids |= {int(s) for s in stop_ids.split(",") if s.strip()}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else min(eos_ids, default=0)
    return eos_ids, pad_id


def completion_row(row: dict, tokenizer, tokens: np.ndarray, logprobs: np.ndarray, truncated: bool) -> dict:
    """The prompt row with its completion text (stop token dropped), length, finish reason, log-prob."""
    toks = tokens.tolist()
    text_toks = toks[:-1] if (toks and not truncated) else toks
    row = dict(row)
    row["completion"] = tokenizer.decode(text_toks, skip_special_tokens=True)
    row["completion_tokens"] = len(toks)
    row["finish_reason"] = "length" if truncated else "stop"
    row["logprob"] = float(logprobs.sum())
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from transformers import AutoTokenizer  # imported here: slow, and only the CLI needs it

    dtype = jnp.dtype(args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tokenizer.padding_side = "left"

    mesh = shd.make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    t0 = time.perf_counter()
    model = models.from_pretrained(args.model, dtype=dtype, param_dtype=dtype, mesh=mesh)
    load_s = time.perf_counter() - t0
    cfg = model.config
    graphdef, params = nnx.split(model)

    eos_ids, pad_id = stop_and_pad_ids(cfg, tokenizer, args.stop_ids)

    param_sh = gen_sh = None
    if mesh is not None:
        param_sh = shd.named_shardings(mesh, models.partition_rules(cfg), params)
        params = jax.device_put(params, param_sh)
        if args.gen_layout:
            gen_sh = generation.generation_shardings(param_sh)
    sampler = generation.make_sampler(
        graphdef,
        max_new_tokens=args.max_new_tokens,
        pad_id=int(pad_id),
        eos_ids=tuple(sorted(eos_ids)),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        mesh=mesh,
        param_shardings=param_sh,
        gen_param_shardings=gen_sh,
    )

    rows = read_prompts(args.prompts, args.prompt_field)
    encoded = encode_prompts(tokenizer, rows, args.prompt_field, args.max_prompt_len)
    width = max(len(x) for x in encoded)
    bs = args.batch_size
    n_batches = math.ceil(len(encoded) / bs)
    batches = [left_pad(encoded[i * bs : (i + 1) * bs], width, bs, int(pad_id)) for i in range(n_batches)]
    rng = jax.random.key(args.seed)

    t0 = time.perf_counter()
    ids0, mask0 = batches[0]
    sampler.timed(params, ids0, mask0, rng, np.arange(bs, dtype=np.int32))  # compile both halves
    compile_s = time.perf_counter() - t0

    totals = dict(prefill_s=0.0, decode_s=0.0, prefill_tokens=0, decode_tokens=0)
    stops = lengths = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for b, (ids, mask) in enumerate(batches):
            real = min(bs, len(encoded) - b * bs)
            mask_real = mask.copy()
            mask_real[real:] = 0  # dummy rows do not count as prompt tokens
            # rows are seeded by their line number: completions do not depend on --batch_size
            row_ids = np.arange(b * bs, (b + 1) * bs, dtype=np.int32)
            out, st = sampler.timed(params, ids, mask, rng, row_ids)
            totals["prefill_s"] += st["prefill_s"]
            totals["decode_s"] += st["decode_s"]
            totals["prefill_tokens"] += int(mask_real.sum())
            resp = np.asarray(out.response_ids)
            rmask = np.asarray(out.response_mask)
            lps = np.asarray(out.logprobs)
            trunc = np.asarray(out.truncated)
            for r in range(real):
                n = int(rmask[r].sum())
                row = completion_row(rows[b * bs + r], tokenizer, resp[r, :n], lps[r, :n], bool(trunc[r]))
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                totals["decode_tokens"] += n
                stops += int(not trunc[r])
                lengths += n

    n = len(encoded)
    summary = {
        "prompts": n,
        "batches": n_batches,
        "batch_size": bs,
        "prompt_width": width,
        "max_new_tokens": args.max_new_tokens,
        "devices": jax.device_count(),
        "load_s": round(load_s, 3),
        "compile_s": round(compile_s, 3),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in totals.items()},
        "prefill_tok_s": round(totals["prefill_tokens"] / max(totals["prefill_s"], 1e-9), 1),
        "decode_tok_s": round(totals["decode_tokens"] / max(totals["decode_s"], 1e-9), 1),
        "stop_rate": round(stops / n, 4),
        "mean_completion_tokens": round(lengths / n, 2),
        "out": args.out,
    }
    print(json.dumps(summary))
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
