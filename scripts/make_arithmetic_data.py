"""Write the built-in arithmetic prompts (src/rlhfkit/data/builtin/).

- `arithmetic`: small additions and subtractions (one- and two-digit operands, never negative),
  the RL stages' first verifiable-reward demo.
- `two-digit-arithmetic`: sums and differences of two two-digit numbers, negative results included
  (half the differences), with an `operation` column (`add` / `subtract`) and held-out rows split
  evenly between the two, so accuracy can be reported per operation (`eval.group_by: operation`),
  and a `worked` answer per row (tens, then units) for an SFT warm-up (`data.columns`).

Both have a verifiable `answer` column. Deterministic: rerunning rewrites identical files.

    python scripts/make_arithmetic_data.py
"""

import json
import random
from pathlib import Path

PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "What is {a} {word} {b}?", "Calculate {a} {op} {b}."]
WORDS = {"+": "plus", "-": "minus"}
# (low, high) operand ranges: one digit, two digits with one, two digits with two.
RANGES = [((1, 9), (1, 9)), ((10, 99), (1, 9)), ((10, 99), (10, 99))]
OPERATIONS = {"+": "add", "-": "subtract"}
FOLDER = Path(__file__).resolve().parents[1] / "src" / "rlhfkit" / "data" / "builtin"


def small_problem(rng: random.Random) -> dict:
    (a_low, a_high), (b_low, b_high) = rng.choice(RANGES)
    a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    text = rng.choice(PHRASINGS).format(a=a, b=b, op=op, word=WORDS[op])
    return {"prompt": text, "answer": a + b if op == "+" else a - b}


def worked(a: int, op: str, b: int) -> str:
    """A worked answer that takes the second number's tens, then its units, and ends with the result:
    "39 + 12 = 39 + 10 + 2 = 49 + 2 = 51." / "64 - 79 = -(79 - 64) = -(79 - 60 - 4) = -(19 - 4) = -15."."""
    if op == "-" and a < b:
        tens, units = a - a % 10, a % 10
        steps = f"-({b} - {a}) = -({b} - {tens} - {units}) = -({b - tens} - {units})"
        return f"{a} - {b} = {steps} = {a - b}." if units else f"{a} - {b} = -({b} - {a}) = {a - b}."
    tens, units = b - b % 10, b % 10
    partial = a + tens if op == "+" else a - tens
    result = a + b if op == "+" else a - b
    if not units:
        return f"{a} {op} {b} = {result}."
    return f"{a} {op} {b} = {a} {op} {tens} {op} {units} = {partial} {op} {units} = {result}."


def two_digit_problem(rng: random.Random, op: str, negative: bool) -> tuple[tuple[int, str, int], dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    while a == b or op == "-" and (a < b) != negative:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    text = rng.choice(PHRASINGS).format(a=a, b=b, op=op, word=WORDS[op])
    answer = a + b if op == "+" else a - b
    return (a, op, b), {"prompt": text, "answer": answer, "operation": OPERATIONS[op], "worked": worked(a, op, b)}


def write(name: str, rows: list[dict]) -> None:
    (FOLDER / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(20261122)
    seen, rows = set(), []
    while len(rows) < 500:
        row = small_problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    write("arithmetic_train.jsonl", rows[:400])
    write("arithmetic_eval.jsonl", rows[400:])

    rng = random.Random(20261206)
    # 500 of each operation, half the differences negative, each problem once whatever its phrasing;
    # every 5th problem of each operation is held out.
    kinds = [("+", False)] * 500 + [("-", False)] * 250 + [("-", True)] * 250
    rng.shuffle(kinds)
    problems: set[tuple[int, str, int]] = set()
    by_operation: dict[str, list[dict]] = {name: [] for name in OPERATIONS.values()}
    for op, negative in kinds:
        problem, row = two_digit_problem(rng, op, negative)
        while problem in problems:
            problem, row = two_digit_problem(rng, op, negative)
        problems.add(problem)
        by_operation[row["operation"]].append(row)
    train = [row for rows in by_operation.values() for i, row in enumerate(rows) if i % 5]
    held_out = [row for rows in by_operation.values() for i, row in enumerate(rows) if not i % 5]
    rng.shuffle(train)
    rng.shuffle(held_out)
    write("two_digit_arithmetic_train.jsonl", train)
    write("two_digit_arithmetic_eval.jsonl", held_out)


if __name__ == "__main__":
    main()
