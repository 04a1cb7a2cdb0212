r"""``python -m jaxrlhf.analysis <command>``: weight divergence, activation divergence, head ablation.

    # per-tensor MSE of a model (or several) to a base, HF directories
    python -m jaxrlhf.analysis divergence --base=sft/hf --model=dpo/hf --out=div.json
    # the same over the orbax checkpoints of training runs started from --base
    python -m jaxrlhf.analysis divergence --base=sft/hf --run=dpo_run ppo_run --out=div_runs.json
    # per-layer residual cosine and logit-lens KL to the base, split by a label column
    python -m jaxrlhf.analysis activations --base=sft/hf --model=dpo/hf ppo/hf --data=prompts.jsonl \
        --tokenizer=TOK --label=label --out=act.json
    # ablate each attention head: loss change on --data, mean-reward change of generations
    python -m jaxrlhf.analysis heads --model=dpo/hf ppo/hf --tokenizer=TOK --data=sft.jsonl \
        --prompts=prompts.jsonl --reward_fn=jaxrlhf.tasks.reviews:reward --out=heads.json

Each command writes ``--out`` (JSON) and a PNG beside it (``--png``; default: ``--out`` with
``.png``). See docs/analysis.md for the definitions and the JSON layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from jaxrlhf.analysis import activations, divergence, heads, inputs, plots

log = logging.getLogger("jaxrlhf.analysis")


def _labels(args, paths: list[str]) -> list[str]:
    if not args.labels:
        return list(paths)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != len(paths):
        raise SystemExit(f"--labels has {len(labels)} names for {len(paths)} models/runs")
    return labels


def _png(args) -> str:
    return args.png or os.path.splitext(args.out)[0] + ".png"


def _write(args, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log.info("wrote %s", args.out)


def _tokenizer(args, fallback: str):
    from jaxrlhf import data as data_lib

    path = args.tokenizer or fallback
    try:
        return data_lib.load_tokenizer(path)
    except Exception as e:  # an HF export has no tokenizer files
        raise SystemExit(f"cannot load a tokenizer from {path!r} ({e}); pass --tokenizer") from e


def _data_cfg(args, path: str):
    return inputs.data_config(
        path,
        split=args.split,
        schema=args.schema,
        max_samples=args.max_samples,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )


# ------------------------------------------------------------------------------------ commands
def cmd_divergence(args) -> dict[str, Any]:
    if bool(args.model) == bool(args.run):
        raise SystemExit("divergence: give --model DIR [DIR ...] or --run WORKDIR [WORKDIR ...]")
    if args.run:
        names = _labels(args, args.run)
        runs = {}
        for name, workdir in zip(names, args.run, strict=True):
            points = divergence.divergence_run(args.base, workdir, key=args.params_key)
            runs[name] = divergence.curve(points, [p["step"] for p in points])
        result = {"base": args.base, "runs": runs}
        plots.divergence_curves(runs, _png(args), xlabel="step")
        return result
    base = divergence.SafetensorsDir(args.base)
    names = _labels(args, args.model)
    summaries = {n: divergence.divergence_dirs(base, m) for n, m in zip(names, args.model, strict=True)}
    if len(summaries) == 1:
        result = next(iter(summaries.values()))
        plots.divergence_layers(summaries, _png(args))
        return result
    result = {"base": args.base, "models": summaries}
    result["curve"] = divergence.curve(list(summaries.values()), names)
    plots.divergence_layers(summaries, _png(args))
    return result


def cmd_activations(args) -> dict[str, Any]:
    tok = _tokenizer(args, args.base)
    ex = inputs.load_examples(_data_cfg(args, args.data), tok, kind=args.kind, label=args.label)
    batches = list(inputs.sequence_batches(ex.dataset, args.batch_size))
    base = inputs.load_model(args.base)
    names = _labels(args, args.model)
    out = {}
    for name, path in zip(names, args.model, strict=True):
        res = activations.activation_divergence(
            inputs.load_model(path), base, batches, labels=ex.labels, tokens=args.tokens
        )
        out[name] = res
        log.info("%s: cosine %s", name, [round(c, 4) for c in res["groups"]["all"]["cosine"]])
    result = {
        "base": args.base,
        "data": args.data,
        "examples": len(ex.dataset),
        "tokens": args.tokens,
        "layers": next(iter(out.values()))["layers"],
        "models": out,
    }
    plots.activation_layers(out, _png(args))
    return result


def cmd_heads(args) -> dict[str, Any]:
    from jaxrlhf import generation

    tok = _tokenizer(args, args.model[0])
    seq_batches = None
    if args.data:
        ex = inputs.load_examples(_data_cfg(args, args.data), tok, kind=args.kind)
        seq_batches = list(inputs.sequence_batches(ex.dataset, args.batch_size))
    prompts, reward = None, None
    if args.reward_fn or args.reward_model:
        path = args.prompts or args.data
        if not path:
            raise SystemExit("heads: a reward needs --prompts (or --data with prompts)")
        pds = inputs.load_examples(_data_cfg(args, path), tok, kind="prompt").dataset
        prompts = list(inputs.prompt_batches(pds, args.batch_size))
        reward = inputs.make_reward(tok, pds, fn=args.reward_fn, model_dir=args.reward_model)
    elif args.prompts:
        raise SystemExit("heads: --prompts needs --reward_fn or --reward_model")
    names = _labels(args, args.model)
    out, samplers = {}, {}
    for name, path in zip(names, args.model, strict=True):
        graphdef, params = inputs.load_model(path)
        sampler = None
        if reward is not None:
            if graphdef not in samplers:  # models of one architecture share one compiled sampler
                samplers[graphdef] = generation.make_sampler(
                    graphdef,
                    max_new_tokens=args.max_new_tokens,
                    pad_id=tok.pad_token_id,
                    eos_ids=inputs.eos_ids(tok),
                    temperature=args.temperature,
                    greedy=args.greedy,
                )
            sampler = samplers[graphdef]
        res = heads.head_ablation(
            graphdef, params, seq_batches=seq_batches, prompt_batches=prompts, sampler=sampler,
            reward=reward, seed=args.seed,
        )  # fmt: skip
        out[name] = res
        log.info("%s: base %s; top by loss %s", name, res["base"], res["rank_by_loss"][:3])
    result = {
        "data": args.data,
        "prompts": args.prompts or (args.data if reward else None),
        "reward": args.reward_fn or args.reward_model,
        "models": out,
    }
    plots.head_heatmaps(out, _png(args))
    return result


# ---------------------------------------------------------------------------------------- CLI
def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--split", default="train", help="dataset split to read")
    p.add_argument("--schema", default="auto", help="config.data.schema (default: detected)")
    p.add_argument("--kind", default="auto", choices=["auto", "sft", "prompt"], help="sequences or prompts")
    p.add_argument("--max_samples", type=int, default=0, help="a seeded subset of this many rows (0: all)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_prompt_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxrlhf.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="output JSON file")
        sp.add_argument("--png", default=None, help="output PNG (default: --out with .png)")
        sp.add_argument("--labels", default="", help="comma-separated names of the models/runs")

    d = sub.add_parser("divergence", help="per-tensor mean squared difference to a base model")
    d.add_argument("--base", required=True, help="HF directory of the base (reference) model")
    d.add_argument("--model", nargs="+", default=None, help="HF directories to compare")
    d.add_argument("--run", nargs="+", default=None, help="run directories (orbax checkpoints)")
    d.add_argument("--params_key", default=None, help="params subtree in a checkpoint (default: detected)")
    common(d)

    a = sub.add_parser("activations", help="per-layer residual cosine and logit-lens KL to a base")
    a.add_argument("--base", required=True)
    a.add_argument("--model", nargs="+", required=True)
    a.add_argument("--data", required=True, help="dataset (file/dir) of prompts or SFT rows")
    a.add_argument("--label", default=None, help="column whose values split the results")
    a.add_argument("--tokens", default="all", choices=["all", "response"], help="which tokens to average")
    _data_flags(a)
    common(a)

    h = sub.add_parser("heads", help="ablate each attention head: loss and reward changes")
    h.add_argument("--model", nargs="+", required=True)
    h.add_argument("--data", default=None, help="dataset for the loss (SFT rows or prompts)")
    h.add_argument("--prompts", default=None, help="prompts for generations (default: --data)")
    h.add_argument("--reward_fn", default=None, help="programmatic reward 'package.module:function'")
    h.add_argument("--reward_model", default=None, help="HF directory of a reward model (scalar head)")
    h.add_argument("--max_new_tokens", type=int, default=32)
    h.add_argument("--temperature", type=float, default=1.0)
    h.add_argument("--greedy", action="store_true")
    h.add_argument("--seed", type=int, default=0)
    _data_flags(h)
    common(h)
    args = p.parse_args(argv)
    if args.command == "heads" and not args.data and not (args.reward_fn or args.reward_model):
        p.error("heads: give --data (loss) and/or --reward_fn/--reward_model with --prompts")
    if args.command == "heads" and args.reward_fn and args.reward_model:
        p.error("heads: give one of --reward_fn and --reward_model")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    run = {"divergence": cmd_divergence, "activations": cmd_activations, "heads": cmd_heads}[args.command]
    result = run(args)
    _write(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
