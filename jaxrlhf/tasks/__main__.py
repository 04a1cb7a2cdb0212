"""Writes the embedded tasks' datasets as JSONL files and rebuilds the shipped tokenizer.

python -m jaxrlhf.tasks reviews sft --n 2000 --seed 0 --out data/reviews_sft.jsonl
python -m jaxrlhf.tasks reviews prompts --n 512 --seed 1 --out data/reviews_prompts.jsonl
python -m jaxrlhf.tasks verifiable sft --n 4000 --noise 0.3 --out data/arith_sft.jsonl
python -m jaxrlhf.tasks verifiable prompts --n 512 --difficulty medium --out data/arith_prompts.jsonl
python -m jaxrlhf.tasks tokenizer [--out DIR]   # default: the shipped asset directory
"""

from __future__ import annotations

import argparse

from jaxrlhf.tasks import reviews, tokenizer, verifiable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxrlhf.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("reviews", "verifiable", "tokenizer"))
    parser.add_argument(
        "kind", nargs="?", choices=("sft", "prompts"), help="dataset to write (not for tokenizer)"
    )
    parser.add_argument("--out", help="output .jsonl file (or tokenizer directory)")
    parser.add_argument("--n", type=int, default=1000, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="verifiable sft: fraction of wrong answers")
    parser.add_argument("--difficulty", default="easy", choices=verifiable.DIFFICULTIES)
    parser.add_argument(
        "--tasks", default=",".join(verifiable.TASKS), help="verifiable: comma-separated tasks"
    )
    args = parser.parse_args(argv)

    if args.task == "tokenizer":
        out = args.out or tokenizer.ASSET_DIR
        tok = tokenizer.build_tokenizer(out)
        print(f"wrote tokenizer ({len(tok)} tokens) to {out}")
        return
    if args.kind is None or args.out is None:
        parser.error(f"{args.task} needs a kind (sft|prompts) and --out")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if args.task == "reviews" and args.kind == "sft":
        n = reviews.write_sft_jsonl(args.out, args.n, args.seed)
    elif args.task == "reviews":
        n = reviews.write_prompts_jsonl(args.out, args.n, args.seed)
    elif args.kind == "sft":
        n = verifiable.write_sft_jsonl(args.out, args.n, args.seed, args.noise, args.difficulty, tasks)
    else:
        n = verifiable.write_prompts_jsonl(args.out, args.n, args.seed, args.difficulty, tasks)
    print(f"wrote {n} rows to {args.out}")


if __name__ == "__main__":
    main()
