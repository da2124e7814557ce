"""Write the built-in `arithmetic` prompts (src/rlhfkit/data/builtin/arithmetic_*.jsonl).

Small additions and subtractions with a verifiable `answer` column, for the RL stages'
verifiable-reward demo. Deterministic: rerunning rewrites identical files.

    python scripts/make_arithmetic_data.py
"""

import json
import random
from pathlib import Path

PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "What is {a} {word} {b}?", "Calculate {a} {op} {b}."]
WORDS = {"+": "plus", "-": "minus"}
# (low, high) operand ranges: one digit, two digits with one, two digits with two.
RANGES = [((1, 9), (1, 9)), ((10, 99), (1, 9)), ((10, 99), (10, 99))]


def problem(rng: random.Random) -> dict:
    (a_low, a_high), (b_low, b_high) = rng.choice(RANGES)
    a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    text = rng.choice(PHRASINGS).format(a=a, b=b, op=op, word=WORDS[op])
    return {"prompt": text, "answer": a + b if op == "+" else a - b}


def main() -> None:
    rng = random.Random(20261122)
    seen, rows = set(), []
    while len(rows) < 500:
        row = problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    folder = Path(__file__).resolve().parents[1] / "src" / "rlhfkit" / "data" / "builtin"
    for name, part in (("arithmetic_train.jsonl", rows[:400]), ("arithmetic_eval.jsonl", rows[400:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
