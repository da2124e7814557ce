"""Built-in verifiable reward functions for the RL stages.

A reward function receives the prompts (the final user message of each), the completions, and
every other column of the prompt rows as keyword lists, and returns one float per completion:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

Name one in a config as ``reward.function: module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

_NUMBER = r"[-\u2212]?\$?\d[\d,]*(?:\.\d+)?"  # a hyphen or the minus sign U+2212
# Explicit answer markers, strongest first; the last number of the text is the fallback.
_MARKED = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"answer(?:\s+is)?\s*:?\s*(?:\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE),
]
_ANY_NUMBER = re.compile(_NUMBER)


def _to_float(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").replace("\u2212", "-")
    try:
        return float(cleaned)
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number a completion gives as its answer: after '####', in \\boxed{}, after 'the answer is',
    else the last number in the text (models often restate the question's numbers first)."""
    for pattern in _MARKED:
        found = pattern.findall(text)
        if found:
            return _to_float(found[-1])
    numbers = _ANY_NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _reference(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"reference answer {value!r} is not a number")
    parsed = final_number(value) if isinstance(value, str) else float(value)
    if parsed is None or not math.isfinite(parsed):
        raise ValueError(f"reference answer {value!r} is not a number")
    return parsed


def numeric_answer(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """1.0 when the completion's final number equals the row's `answer` (relative tolerance 1e-6), else 0.0.

    `answer` may be a number or a text ending in one (GSM8K's "... #### 18" works).
    """
    if answer is None:
        raise ValueError("numeric_answer needs an `answer` column in the prompt data (map yours with data.columns)")
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        predicted = final_number(completion)
        target = _reference(reference)
        rewards.append(
            1.0 if predicted is not None and math.isclose(predicted, target, rel_tol=1e-6, abs_tol=1e-9) else 0.0
        )
    return rewards
