"""The benchmark's data, written once per run so both frameworks train on the same rows.

SFT examples and preference pairs come from the OpenAssistant trees in ../shared/data (single-turn
conversations of mixed length, none longer than the suite's max_length, so neither tool truncates);
without that folder, from rlhfkit's built-in tutor data. RL prompts are the built-in arithmetic
problems, scored by rlhfkit's `numeric_answer`. Each tool gets the rows in the format it reads
(rlhfkit: `messages` / plain prompts; TRL: conversational prompt-completion / preference rows).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from benchmarks.suites import Suite

OASST = "oasst-en100-trees"


def shared_data_dir() -> Path | None:
    """../shared/data next to the repository (or $RLHFKIT_BENCH_DATA), when present."""
    candidate = Path(os.environ.get("RLHFKIT_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return candidate if (candidate / OASST).is_dir() else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _chat_length(tokenizer: Any, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _sample(rows: list, count: int, seed: int) -> list:
    if len(rows) < count:
        raise SystemExit(f"benchmark data: need {count} rows that fit, found {len(rows)}")
    return random.Random(seed).sample(rows, count)


def sft_pairs(suite: Suite, tokenizer: Any, data_dir: Path | None) -> tuple[list[tuple[str, str]], str]:
    """(prompt, response) pairs no longer than max_length tokens, and where they came from."""
    if data_dir is not None:
        path = data_dir / OASST / "oasst_sft_best_reply.jsonl"
        rows = [
            (r["messages"][0]["content"], r["messages"][1]["content"])
            for r in _read_jsonl(path)
            if len(r["messages"]) == 2
        ]
        source = f"{OASST}/oasst_sft_best_reply.jsonl (single-turn)"
    else:
        from rlhfkit.data.loading import builtin_file

        rows = [(r["prompt"], r["completion"]) for r in _read_jsonl(builtin_file("tutor-sft")[0])]
        source = "builtin:tutor-sft"
    fitting = [(p, a) for p, a in rows if _chat_length(tokenizer, [_user(p), _assistant(a)]) <= suite.max_length]
    return _sample(fitting, suite.sft_examples, suite.seed), source


def preference_triples(suite: Suite, tokenizer: Any, data_dir: Path | None) -> tuple[list[tuple[str, str, str]], str]:
    """(prompt, chosen, rejected) whose longer answer fits max_length tokens, and their source."""
    if data_dir is not None:
        path = data_dir / OASST / "oasst_pairs_best_vs_worst.jsonl"
        rows = [
            (r["prompt"][0]["content"], r["chosen"], r["rejected"]) for r in _read_jsonl(path) if len(r["prompt"]) == 1
        ]
        source = f"{OASST}/oasst_pairs_best_vs_worst.jsonl (single-turn)"
    else:
        from rlhfkit.data.loading import builtin_file

        rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in _read_jsonl(builtin_file("tutor-prefs")[0])]
        source = "builtin:tutor-prefs"
    fitting = [
        row
        for row in rows
        if max(_chat_length(tokenizer, [_user(row[0]), _assistant(answer)]) for answer in row[1:]) <= suite.max_length
    ]
    return _sample(fitting, suite.pairs, suite.seed), source


def prepare(suite: Suite, tokenizer: Any, workdir: Path) -> dict[str, Any]:
    """Write every workload's data for both tools into workdir; returns the file paths and sources."""
    from rlhfkit.data.loading import builtin_file

    data_dir = shared_data_dir() if suite.shared_data else None
    workdir.mkdir(parents=True, exist_ok=True)
    sft, sft_source = sft_pairs(suite, tokenizer, data_dir)
    pairs, pair_source = preference_triples(suite, tokenizer, data_dir)
    arithmetic = _read_jsonl(builtin_file("arithmetic")[0])
    files = {
        "sft_rlhfkit": _write_jsonl(
            workdir / "sft_rlhfkit.jsonl", [{"messages": [_user(p), _assistant(a)]} for p, a in sft]
        ),
        "sft_trl": _write_jsonl(
            workdir / "sft_trl.jsonl", [{"prompt": [_user(p)], "completion": [_assistant(a)]} for p, a in sft]
        ),
        "pairs_rlhfkit": _write_jsonl(
            workdir / "pairs_rlhfkit.jsonl", [{"prompt": [_user(p)], "chosen": c, "rejected": r} for p, c, r in pairs]
        ),
        "pairs_trl": _write_jsonl(
            workdir / "pairs_trl.jsonl",
            [{"prompt": [_user(p)], "chosen": [_assistant(c)], "rejected": [_assistant(r)]} for p, c, r in pairs],
        ),
        "prompts_rlhfkit": _write_jsonl(
            workdir / "prompts_rlhfkit.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic]
        ),
        "prompts_trl": _write_jsonl(
            workdir / "prompts_trl.jsonl", [{"prompt": [_user(r["prompt"])], "answer": r["answer"]} for r in arithmetic]
        ),
    }
    sft_lengths = [_chat_length(tokenizer, [_user(p), _assistant(a)]) for p, a in sft]
    pair_lengths = [
        _chat_length(tokenizer, [_user(p), _assistant(answer)]) for p, *answers in pairs for answer in answers
    ]
    summary = {
        "files": files,
        "sources": {"sft": sft_source, "pairs": pair_source, "prompts": "builtin:arithmetic"},
        "sft_tokens": {
            "examples": len(sft),
            "total": sum(sft_lengths),
            "min": min(sft_lengths),
            "max": max(sft_lengths),
        },
        "pair_tokens": {
            "sequences": len(pair_lengths),
            "total": sum(pair_lengths),
            "min": min(pair_lengths),
            "max": max(pair_lengths),
        },
    }
    (workdir / "data.json").write_text(json.dumps(summary, indent=2))
    return summary
