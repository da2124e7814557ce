"""Worked answers for an SFT warm-up before GRPO on MAWPS SingleOp.

    python scripts/mawps_worked_answers.py            # writes runs/examples/mawps-worked.jsonl

The embedded model restates a word problem at length before any answer, so within an RL-sized
completion budget it rarely reaches a number the reward can read (measured: 84-94% of 64-token
completions cut off, most GRPO groups without reward variance). SFT on answers in the form
"7 + 2 = 9. The answer is 9." teaches the format in a few steps and, over three epochs, which
numbers a problem combines and how (greedy held-out accuracy 0.48). Each answer is derived
from the problem's own numbers and its target: the first ordered pair (a, b) of numbers in the
question with a + b, a - b, a × b or a ÷ b equal to the target. Only the problems GRPO trains
on are used — the split comes from the GRPO config itself, so its held-out problems are never
seen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path

from rlhfkit.config.loading import load_config
from rlhfkit.data.examples import load_examples, prompt_examples

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
OPERATIONS = [
    ("+", lambda a, b: a + b),
    ("-", lambda a, b: a - b),
    ("*", lambda a, b: a * b),
    ("/", lambda a, b: a / b if b else math.nan),
]


def show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def worked_answer(question: str, target: float) -> str | None:
    """'a op b = target. The answer is target.' from the question's numbers, or None if no single operation fits."""
    numbers = [float(text.replace(",", "")) for text in NUMBER.findall(question)]
    for (a, b), (symbol, apply) in itertools.product(itertools.permutations(numbers, 2), OPERATIONS):
        if math.isclose(apply(a, b), target, rel_tol=1e-6, abs_tol=1e-9):
            return f"{show(a)} {symbol} {show(b)} = {show(target)}. The answer is {show(target)}."
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpo-config", default="configs/examples/grpo_mawps.yaml")
    parser.add_argument("--output", type=Path, default=Path("runs/examples/mawps-worked.jsonl"))
    args = parser.parse_args(argv)
    config = load_config("grpo", args.grpo_config)
    train_examples, eval_examples, _ = load_examples(config.data, config.train.seed, prompt_examples)
    rows, unworked = [], 0
    for example in train_examples:
        question = example.prompt[-1]["content"]
        answer = worked_answer(question, float(example.columns["answer"]))
        if answer is None:
            unworked += 1
            continue
        system = [{"role": "system", "content": config.data.system_prompt}] if config.data.system_prompt else []
        rows.append({"messages": [*system, *example.prompt, {"role": "assistant", "content": answer}]})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"{args.output}: {len(rows)} worked answers from {len(train_examples)} training problems "
        f"({unworked} without a single-operation answer; {len(eval_examples)} held-out problems left out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
