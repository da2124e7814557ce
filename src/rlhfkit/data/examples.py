"""Dataset kinds and their row validation.

| kind              | columns                                    | used by       |
|-------------------|--------------------------------------------|---------------|
| text              | ``text``                                   | pretrain, sft |
| prompt-completion | ``prompt`` + ``completion``, or ``messages`` | sft           |
| preference        | ``prompt`` + ``chosen`` + ``rejected``, or ``chosen`` + ``rejected`` sharing a prompt prefix | reward, dpo |
| prompt            | ``prompt`` (text or messages); other columns are passed to reward functions | ppo, grpo, trpo |
| unpaired feedback | ``prompt`` + ``completion`` + ``label`` (true: 👍), optional ``rating`` 1–5; or preference rows, unpaired | kto |

A bad row either stops the run with the row named, or (``invalid_rows: skip``) is dropped and
counted in the returned :class:`RowReport`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from rlhfkit.config import DataSettings
from rlhfkit.data.loading import EXTRA_FIELDS, Row, load_splits, row_key
from rlhfkit.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextExample:
    text: str
    where: str


@dataclass(frozen=True)
class ChatExample:
    """A conversation; the loss is taken on assistant turns only."""

    messages: tuple[dict[str, str], ...]
    where: str


@dataclass
class RowReport:
    """How many rows were kept and why the others were skipped."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicates: int = 0  # kept rows equal to an earlier kept row (kept: repeating a row may be deliberate)
    weighted_copies: int = 0  # of those, the copies data.mix weights made

    def summary(self) -> str:
        found = self.duplicates - self.weighted_copies
        repeated = [f"{found} duplicates of earlier rows, kept"] if found else []
        repeated += [f"{self.weighted_copies} copies by data.mix weights"] if self.weighted_copies else []
        repeated = f" ({'; '.join(repeated)})" if repeated else ""
        if not self.skipped:
            return f"{self.kept} rows{repeated}"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"{self.kept} rows kept{repeated}, {sum(self.skipped.values())} skipped ({reasons})"


def training_data_summary(
    report: RowReport, adjustments: dict[str, int], train_count: int, eval_count: int, unit: str
) -> str:
    """The data line a stage prints (rows read and skipped, length adjustments, the split); a
    DataError naming those counts when nothing is left to train on, before any model loads."""
    adjusted = "".join(f"; {count} {reason}" for reason, count in adjustments.items())
    summary = f"{report.summary()}{adjusted}; {train_count} train / {eval_count} eval {unit}"
    if train_count == 0:
        raise DataError(f"nothing to train on: {summary}")
    return summary


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


MAX_ROW_CHARACTERS = 8_000_000  # tokenising one such row takes about 1 GB; split longer documents


def _strings(value, path: str):
    """(where, text) for every string in a row's value, at any depth."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _check_row_shape(row: Row) -> None:
    """What must hold of any row before it is parsed or tokenised: no CSV fields beyond the
    header, text that is valid Unicode, and a size a tokenizer can take."""
    if EXTRA_FIELDS in row.values:
        named, extra = len(row.values) - 1, len(row.values[EXTRA_FIELDS])
        raise _BadRow(
            "more fields than the header",
            f"{named + extra} fields, but the header names {named} (quote fields that hold commas)",
        )
    total = 0
    for where, text in _strings(row.values, ""):
        total += len(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadRow(
                "invalid Unicode",
                f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}",
            ) from None
    if total > MAX_ROW_CHARACTERS:
        raise _BadRow(
            "oversized row",
            f"more than {MAX_ROW_CHARACTERS:,} characters of text ({total:,}); split the document into several rows",
        )


def row_problem(row: Row) -> str | None:
    """Why `row` cannot be read as text at all (see _check_row_shape), or None."""
    try:
        _check_row_shape(row)
    except _BadRow as bad:
        return str(bad)
    return None


def _string_field(values: dict, column: str) -> str:
    value = values[column]
    if not isinstance(value, str):
        raise _BadRow(f"non-string {column}", f"column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {column}", f"column {column!r} is empty")
    return value


def _messages_field(values: dict) -> tuple[dict[str, str], ...]:
    messages = values["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadRow("bad messages", "column 'messages' must be a non-empty list of {role, content} objects")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _BadRow("bad messages", f"messages[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise _BadRow("bad messages", f"messages[{index}].role is {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise _BadRow("bad messages", f"messages[{index}].content must be a non-empty string")
        cleaned.append({"role": message["role"], "content": message["content"]})
    if not any(message["role"] == "assistant" for message in cleaned):
        raise _BadRow("no assistant turn", "messages has no assistant turn to learn from")
    return tuple(cleaned)


def detect_kind(rows: list[Row], allowed: tuple[str, ...]) -> Literal["text", "prompt-completion", "messages"]:
    """Decide the dataset kind from the first row's columns."""
    first = rows[0]
    columns = set(first.values)
    if "messages" in columns and "messages" in allowed:
        return "messages"
    if {"prompt", "completion"} <= columns and "prompt-completion" in allowed:
        return "prompt-completion"
    if "text" in columns and "text" in allowed:
        return "text"
    expected = {"text": "`text`", "prompt-completion": "`prompt` and `completion`", "messages": "`messages`"}
    wanted = " or ".join(expected[kind] for kind in allowed)
    raise DataError(
        f"{first.where}: missing column: expected {wanted}; found {sorted(columns)} "
        "(map yours with data.columns, e.g. --set data.columns.prompt=question)"
    )


def _validate(rows: list[Row], parse, on_invalid: str) -> tuple[list, RowReport]:
    report = RowReport()
    examples = []
    seen: set[str] = set()
    for row in rows:
        try:
            _check_row_shape(row)
            examples.append(parse(row))
        except KeyError as exc:
            raise DataError(f"{row.where}: missing column {exc.args[0]!r} (present: {sorted(row.values)})") from None
        except _BadRow as bad:
            if on_invalid == "error":
                raise DataError(f"{row.where}: {bad}") from None
            report.skipped[bad.reason] += 1
            continue
        report.kept += 1
        key = row_key(row)
        report.duplicates += key in seen
        seen.add(key)
    if not examples:
        raise DataError(f"{rows[0].where.rsplit(':', 1)[0]}: every row was invalid ({report.summary()})")
    return examples, report


def text_examples(rows: list[Row], on_invalid: str = "error") -> tuple[list[TextExample], RowReport]:
    """Validate rows of the `text` kind."""
    detect_kind(rows, ("text",))
    return _validate(rows, lambda row: TextExample(_string_field(row.values, "text"), row.where), on_invalid)


def chat_examples(rows: list[Row], on_invalid: str = "error") -> tuple[list[ChatExample | TextExample], RowReport]:
    """Validate SFT rows: prompt/completion pairs, chat messages, or plain text (all tokens trained)."""
    kind = detect_kind(rows, ("messages", "prompt-completion", "text"))

    def parse(row: Row) -> ChatExample | TextExample:
        if kind == "text":
            return TextExample(_string_field(row.values, "text"), row.where)
        if kind == "messages":
            return ChatExample(_messages_field(row.values), row.where)
        prompt = _string_field(row.values, "prompt")
        completion = _string_field(row.values, "completion")
        return ChatExample(
            ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion}), row.where
        )

    return _validate(rows, parse, on_invalid)


# ---- preference pairs ------------------------------------------------------------------

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt and two answers, the first preferred. The prompt may be a whole conversation."""

    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    where: str
    margin: float | None = None


def _parse_hh_transcript(text: str) -> tuple[dict[str, str], ...]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user/assistant/user messages."""
    parts = HH_TURN.split(text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if parts[0].strip():
        messages.insert(0, {"role": "user", "content": parts[0].strip()})
    return tuple(messages)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[tuple[dict[str, str], ...], str, str]:
    """Split two full transcripts that share everything but the final answer ("implicit prompt").

    Human/Assistant transcripts (Anthropic HH style) are cut after the last "Assistant:" of the
    shared prefix and the prompt is parsed into turns; other texts are cut at the last whitespace
    of the shared prefix and the prompt becomes one user message.
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    prefix = chosen[:shared]
    marker = prefix.rfind("\n\nAssistant:")
    if marker >= 0:
        cut = marker + len("\n\nAssistant:")
        prompt = _parse_hh_transcript(prefix[:marker])
    else:
        cut = max(prefix.rfind(" "), prefix.rfind("\n")) + 1
        prompt = ({"role": "user", "content": prefix[:cut].strip()},) if prefix[:cut].strip() else ()
    if not prompt:
        raise _BadRow("no shared prompt", "chosen and rejected share no prompt (give a `prompt` column)")
    return prompt, chosen[cut:].strip(), rejected[cut:].strip()


def _answer_field(values: dict, column: str, prompt: tuple[dict[str, str], ...]) -> str:
    value = values[column]
    if isinstance(value, list):
        # Conversational form: [{"role": "assistant", ...}], or the whole conversation — the
        # prompt's turns, then the answer (as in UltraFeedback) — whose last turn is the answer.
        turns = [(m.get("role"), m.get("content")) if isinstance(m, dict) else None for m in value]
        if not turns or turns[-1] is None or turns[-1][0] != "assistant":
            raise _BadRow(
                f"bad {column}", f"column {column!r} must be a string or messages ending with an assistant turn"
            )
        if len(turns) > 1 and turns[:-1] != [(m["role"], m["content"]) for m in prompt]:
            raise _BadRow(
                f"bad {column}", f"column {column!r} holds a conversation that does not start with the row's prompt"
            )
        value = turns[-1][1]
    if not isinstance(value, str):
        raise _BadRow(f"non-string {column}", f"column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {column}", f"column {column!r} is empty")
    return value


def _parse_preference(row: Row) -> PreferenceExample:
    values = row.values
    if "prompt" in values:
        prompt_value = values["prompt"]
        if isinstance(prompt_value, list):
            prompt = _messages_field({"messages": prompt_value + [{"role": "assistant", "content": "x"}]})[:-1]
        else:
            prompt = ({"role": "user", "content": _string_field(values, "prompt")},)
        chosen, rejected = _answer_field(values, "chosen", prompt), _answer_field(values, "rejected", prompt)
    else:
        chosen_text, rejected_text = _string_field(values, "chosen"), _string_field(values, "rejected")
        if chosen_text == rejected_text:
            raise _BadRow("chosen equals rejected", "chosen and rejected are identical")
        prompt, chosen, rejected = split_shared_prefix(chosen_text, rejected_text)
        if not chosen or not rejected:
            raise _BadRow("empty answer", "after removing the shared prompt, an answer is empty")
    if chosen.strip() == rejected.strip():
        raise _BadRow("chosen equals rejected", "chosen and rejected are identical")
    margin = values.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise _BadRow("bad margin", f"column 'margin' must be a number, got {margin!r}")
    return PreferenceExample(prompt, chosen, rejected, row.where, None if margin is None else float(margin))


def preference_examples(rows: list[Row], on_invalid: str = "error") -> tuple[list[PreferenceExample], RowReport]:
    """Validate preference rows: prompt/chosen/rejected, or chosen/rejected sharing a prompt prefix."""
    columns = set(rows[0].values)
    if not {"chosen", "rejected"} <= columns:
        raise DataError(
            f"{rows[0].where}: missing column: expected `chosen` and `rejected` (and usually `prompt`); "
            f"found {sorted(columns)} (map yours with data.columns)"
        )
    return _validate(rows, _parse_preference, on_invalid)


# ---- unpaired feedback (thumbs up / down) ----------------------------------------------

LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass(frozen=True)
class FeedbackExample:
    """One answer to a prompt, labelled desirable (👍, True) or undesirable (👎, False)."""

    prompt: tuple[dict[str, str], ...]
    completion: str
    label: bool
    where: str
    rating: float | None = None


def _label_field(values: dict) -> bool:
    """A bool, 0/1, or (as CSV gives it) true/false, 1/0, yes/no in any case."""
    value = values["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise _BadRow("bad label", f"column 'label' must be true or false (👍 / 👎), got {value!r}")


def _rating_field(values: dict) -> float | None:
    value = values.get("rating")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _BadRow("bad rating", f"column 'rating' must be a number from 1 to 5, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 5:
        raise _BadRow("bad rating", f"column 'rating' must be a number from 1 to 5, got {value!r}")
    return float(value)


def _prompt_field(values: dict) -> tuple[dict[str, str], ...]:
    """A `prompt` column: text (one user turn) or messages that do not end with an assistant turn."""
    value = values["prompt"]
    if isinstance(value, list):
        if value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            raise _BadRow("bad prompt", "the prompt's messages must not end with an assistant turn")
        return _messages_field({"messages": value + [{"role": "assistant", "content": "x"}]})[:-1]
    return ({"role": "user", "content": _string_field(values, "prompt")},)


def _parse_feedback(row: Row) -> FeedbackExample:
    prompt = _prompt_field(row.values)
    completion = _answer_field(row.values, "completion", prompt)
    return FeedbackExample(prompt, completion, _label_field(row.values), row.where, _rating_field(row.values))


def feedback_examples(rows: list[Row], on_invalid: str = "error") -> tuple[list[FeedbackExample], RowReport]:
    """Validate unpaired feedback rows (prompt/completion/label[/rating]). Preference rows are
    accepted too and unpaired: each pair gives its chosen answer as desirable and its rejected
    answer as undesirable (as TRL's `unpair_preference_dataset`)."""
    columns = set(rows[0].values)
    if {"chosen", "rejected"} <= columns and "label" not in columns:
        pairs, report = preference_examples(rows, on_invalid)
        unpaired = [
            FeedbackExample(pair.prompt, answer, label, f"{pair.where} ({name})")
            for pair in pairs
            for name, answer, label in (("chosen", pair.chosen, True), ("rejected", pair.rejected, False))
        ]
        return unpaired, report
    if not {"prompt", "completion", "label"} <= columns:
        raise DataError(
            f"{rows[0].where}: missing column: expected `prompt`, `completion` and `label` (or preference "
            f"rows with `chosen` and `rejected`); found {sorted(columns)} (map yours with data.columns)"
        )
    return _validate(rows, _parse_feedback, on_invalid)


def label_counts(examples: list[FeedbackExample], where: str, minimum_each: int = 1) -> tuple[int, int]:
    """(desirable, undesirable) counts; a DataError naming them when one class has fewer than
    `minimum_each` examples (a model cannot learn to tell 👍 from 👎 without both)."""
    desirable = sum(example.label for example in examples)
    undesirable = len(examples) - desirable
    if min(desirable, undesirable) < minimum_each:
        raise DataError(
            f"{where}: {desirable} desirable (label true) and {undesirable} undesirable (label false) "
            f"examples; at least {minimum_each} of each are needed"
        )
    return desirable, undesirable


# ---- prompts for online RL --------------------------------------------------------------


@dataclass(frozen=True)
class PromptExample:
    """A prompt to sample completions for; `columns` holds the row's other values (e.g. a reference answer)."""

    prompt: tuple[dict[str, str], ...]
    columns: dict
    where: str


def _parse_prompt(row: Row) -> PromptExample:
    values = row.values
    prompt = _prompt_field(values)
    return PromptExample(prompt, {key: item for key, item in values.items() if key != "prompt"}, row.where)


def _parse_prompt_of_pair(row: Row) -> PromptExample:
    """The prompt of a preference row whose chosen and rejected transcripts share it (HH-style)."""
    pair = _parse_preference(row)
    rest = {key: item for key, item in row.values.items() if key not in ("chosen", "rejected")}
    return PromptExample(pair.prompt, rest, row.where)


def prompt_examples(rows: list[Row], on_invalid: str = "error") -> tuple[list[PromptExample], RowReport]:
    """Validate RL prompt rows: a `prompt` column (map another with data.columns, e.g. {prompt:
    question}), or preference rows without one — chosen/rejected transcripts whose shared start
    is the prompt (as the reward stage splits them), so a preference file's prompts can be sampled."""
    columns = set(rows[0].values)
    if "prompt" not in columns and {"chosen", "rejected"} <= columns:
        return _validate(rows, _parse_prompt_of_pair, on_invalid)
    if "prompt" not in columns:
        raise DataError(
            f"{rows[0].where}: missing column: expected `prompt`; found {sorted(rows[0].values)} "
            "(map yours with data.columns, e.g. --set data.columns.prompt=question)"
        )
    return _validate(rows, _parse_prompt, on_invalid)


def load_examples(data: DataSettings, seed: int, parse) -> tuple[list, list, RowReport]:
    """Train and held-out examples of one kind (parse: text_examples, chat_examples, ...), validated."""
    train, held_out_parts, report = load_examples_by_source(data, seed, parse)
    return train, [example for examples in held_out_parts.values() for example in examples], report


def load_examples_by_source(data: DataSettings, seed: int, parse) -> tuple[list, dict[str, list], RowReport]:
    """As load_examples, with the held-out examples of each source (data.path, then data.mix) apart."""
    splits = load_splits(data, seed)
    train, report = parse(splits.train, data.invalid_rows)
    report.weighted_copies = min(splits.weighted_copies, report.duplicates)
    held_out_parts = {
        source: parse(rows, data.invalid_rows)[0] if rows else [] for source, rows in splits.eval_parts.items()
    }
    return train, held_out_parts, report
