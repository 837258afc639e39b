"""A synthetic instruction task that a tiny Llama learns on CPU in a couple of minutes (the quick start).

Short questions about numbers with one-word answers, each solvable by a rule that generalizes to numbers
never seen in training (so held-out exact match shows learning, not memorization):

    Is 4817 even or odd?               -> odd
    Which is larger: 38 or 71?         -> 71
    What comes after 259?              -> 260
    Reverse the digits of 4720.        -> 0274

``python -m collie.data.synthetic OUT_DIR`` writes ``train.jsonl``, ``eval.jsonl`` (disjoint from train) and a
sentencepiece ``tokenizer.model`` trained on them; ``data/quickstart/`` holds the shipped copy.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from collie.data.instruction import alpaca_template, record_to_messages
from collie.data.tokenizer import train_sentencepiece


def parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10000)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger: {a} or {b}?", str(max(a, b))


def successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10000)
    return f"What comes after {n}?", str(n + 1)


def reverse_digits(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1000, 10000)
    return f"Reverse the digits of {n}.", str(n)[::-1]


TASKS = (parity, larger, successor, reverse_digits)


def generate_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct Alpaca-style records ``{"instruction", "input", "output"}``, the same for the same seed;
    the tasks take turns, so every one is equally represented."""
    rng, seen, examples = random.Random(seed), set(), []
    while len(examples) < n:
        question, answer = TASKS[len(examples) % len(TASKS)](rng)
        if question not in seen:
            seen.add(question)
            examples.append({"instruction": question, "output": answer})
    return examples


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def rendered_text(records: list[dict]) -> list[str]:
    """Records as the alpaca template shows them, so the tokenizer learns the template's words too."""
    return ["".join(text for text, _ in alpaca_template(record_to_messages(r, "synthetic"), None))
            for r in records]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic quick-start task and its tokenizer.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000, help="training examples")
    parser.add_argument("--eval", type=int, default=200, help="held-out examples (none in train)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    examples = generate_examples(args.train + args.eval, args.seed)
    train, held_out = examples[:args.train], examples[args.train:]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", held_out)
    train_sentencepiece(rendered_text(train), args.out_dir / "tokenizer", args.vocab_size)
    print(f"wrote {len(train)} train and {len(held_out)} eval examples and tokenizer.model to {args.out_dir}")


if __name__ == "__main__":
    main()
