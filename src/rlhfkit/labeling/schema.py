"""The labeling store's tables, and the rows it hands out.

A store labels one kind of task (`TaskKind`): pairs of responses judged A better / B better /
tie / both bad (`pairs`, `judgements`), or single responses judged 👍 or 👎 with an optional 1–5
rating (`answers`, `verdicts`). Prompts, responses, annotators and settings are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Choice = Literal["a", "b", "tie", "both_bad"]
CHOICES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
THUMBS: tuple[str, ...] = ("up", "down")
TaskKind = Literal["pairwise", "single"]
TASK_KINDS: tuple[str, ...] = ("pairwise", "single")
Messages = tuple[dict[str, str], ...]

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY, messages TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id), model TEXT NOT NULL,
    text TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response_a INTEGER NOT NULL REFERENCES responses(id), response_b INTEGER NOT NULL REFERENCES responses(id),
    required INTEGER NOT NULL DEFAULT 1 CHECK (required > 0), UNIQUE (response_a, response_b));
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL CHECK (kind IN ('human', 'judge')),
    token_hash TEXT UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY, response_id INTEGER NOT NULL UNIQUE REFERENCES responses(id),
    required INTEGER NOT NULL DEFAULT 1 CHECK (required > 0));
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY, answer_id INTEGER NOT NULL REFERENCES answers(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    label TEXT NOT NULL CHECK (label IN ('up', 'down')), rating INTEGER CHECK (rating BETWEEN 1 AND 5),
    comment TEXT NOT NULL DEFAULT '', submission_id TEXT NOT NULL, current INTEGER CHECK (current = 1),
    created TEXT NOT NULL, UNIQUE (annotator_id, submission_id));
CREATE UNIQUE INDEX IF NOT EXISTS one_current_verdict ON verdicts (answer_id, annotator_id, current);
"""

# A submission id is the annotator's own (a client makes it), so it is unique per annotator only.
JUDGEMENTS = """
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')), comment TEXT NOT NULL DEFAULT '',
    left TEXT NOT NULL CHECK (left IN ('a', 'b')),  -- which response was shown on the left
    submission_id TEXT NOT NULL, current INTEGER CHECK (current = 1), created TEXT NOT NULL,
    UNIQUE (annotator_id, submission_id));
-- At most one current judgement per annotator and pair (NULLs, the history, are not compared).
CREATE UNIQUE INDEX IF NOT EXISTS one_current ON judgements (pair_id, annotator_id, current);
"""
SCHEMA_VERSION = 3  # 1: submission ids unique across all annotators; 2: pairwise tasks only

# kind -> (task table, label table, the label table's task column)
TASK_TABLES = {"pairwise": ("pairs", "judgements", "pair_id"), "single": ("answers", "verdicts", "answer_id")}


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: Messages
    response_a: str
    response_b: str
    model_a: str
    model_b: str
    required: int


@dataclass(frozen=True)
class Answer:
    """A single-answer task: one response to a prompt, to be labelled 👍 or 👎."""

    id: int
    prompt: Messages
    response: str
    model: str
    required: int


@dataclass(frozen=True)
class Verdict:
    answer_id: int
    annotator: str
    kind: str
    label: str  # "up" or "down"
    rating: int | None
    comment: str
    created: str


@dataclass(frozen=True)
class Judgement:
    pair_id: int
    annotator: str
    kind: str
    choice: str
    comment: str
    left: str
    created: str
