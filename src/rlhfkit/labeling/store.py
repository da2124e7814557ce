"""The labeling store: prompts, candidate responses, the tasks people label, annotators and labels in SQLite.

A store labels one kind of task, chosen when it is created (`kind`): **pairwise** — pairs of
responses, judged A better / B better / tie / both bad (`judgements`) — or **single** — one
response at a time, judged 👍 or 👎 with an optional 1–5 rating (`verdicts`).

WAL mode lets a web server read while it writes, and every write is one transaction, so stopping
the server mid-session loses nothing that was acknowledged. Submissions carry a client-made id:
a retried or double-clicked submission is stored once. An annotator's later label of a task
replaces the earlier one as the current one; the earlier row is kept as history.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from rlhfkit.errors import UserError
from rlhfkit.labeling.schema import (
    CHOICES,
    JUDGEMENTS,
    SCHEMA,
    SCHEMA_VERSION,
    TASK_KINDS,
    TASK_TABLES,
    THUMBS,
    Answer,
    Judgement,
    Messages,
    Pair,
    TaskKind,
    Verdict,
)


class SubmissionConflict(ValueError):
    """An annotator reused a submission id for a different judgement."""


class WrongTaskKind(UserError):
    """A label for a task of the other kind than the store's (a pair in a single-answer store, or the reverse)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LabelStore:
    """One SQLite file; open one LabelStore per thread, request or process (never share one between them)."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise UserError(f"{self.path}: no labeling store here (create one with `rlhfkit label generate`)")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory, not a labeling store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One request uses a connection at a time, but the web framework may open and close it on
        # different worker threads; hence check_same_thread=False (never share one across requests).
        self.connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.connection.row_factory = sqlite3.Row
        try:
            # Opening an existing store reads before it writes: a file that is not one (empty,
            # another program's database) is refused untouched.
            tables = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pairs'"
            if not create and self.connection.execute(tables).fetchone() is None:
                raise UserError(
                    f"{self.path}: not a labeling store (no rlhfkit tables in it; create one with `rlhfkit label generate`)"
                )
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA foreign_keys=ON")
            self._create_or_upgrade_schema()
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise UserError(f"{self.path}: not a labeling store ({error})") from None
        except UserError:
            self.connection.close()
            raise

    def _create_or_upgrade_schema(self) -> None:
        """Create the tables, or bring a store written by an earlier version up to SCHEMA_VERSION in one transaction."""
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path}: written by a newer rlhfkit (store version {version}); upgrade rlhfkit")
            had_judgements = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'judgements'"
            ).fetchone()
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if had_judgements and version < 2:
                db.execute("ALTER TABLE judgements RENAME TO judgements_v1")
                db.execute("DROP INDEX IF EXISTS one_current")
            for statement in JUDGEMENTS.split(";"):
                if statement.strip():
                    db.execute(statement)
            if had_judgements and version < 2:
                db.execute("INSERT INTO judgements SELECT * FROM judgements_v1")
                db.execute("DROP TABLE judgements_v1")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.connection.close()

    @property
    def kind(self) -> TaskKind:
        """What this store's annotators label: "pairwise" (the default, and every store written
        before single answers existed) or "single"."""
        row = self.connection.execute("SELECT value FROM settings WHERE key = 'kind'").fetchone()
        return row["value"] if row else "pairwise"

    def set_kind(self, kind: TaskKind) -> None:
        """Choose the kind of task; a store that already holds tasks of the other kind is refused."""
        if kind not in TASK_KINDS:
            raise UserError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
        with self.transaction() as db:
            current = db.execute("SELECT value FROM settings WHERE key = 'kind'").fetchone()
            current_kind = current["value"] if current else "pairwise"
            holds = db.execute(f"SELECT COUNT(*) FROM {TASK_TABLES[current_kind][0]}").fetchone()[0]
            if current_kind != kind and holds:
                raise UserError(
                    f"{self.path} labels {current_kind} tasks ({holds} of them); use another store for {kind} tasks"
                )
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('kind', ?)", (kind,))

    def setting(self, key: str) -> str | None:
        row = self.connection.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def labelled_tasks(self, kinds: Sequence[str] = ("human",)) -> tuple[int, int]:
        """(tasks with at least their required current labels from annotators of these kinds, all tasks)."""
        tasks, labels, column = TASK_TABLES[self.kind]
        marks = ",".join("?" * len(kinds))
        done = self.connection.execute(
            f"""SELECT COUNT(*) FROM {tasks} t WHERE t.required <= (
                   SELECT COUNT(*) FROM {labels} l JOIN annotators a ON a.id = l.annotator_id
                   WHERE l.{column} = t.id AND l.current = 1 AND a.kind IN ({marks}))""",
            tuple(kinds),
        ).fetchone()[0]
        return done, self.connection.execute(f"SELECT COUNT(*) FROM {tasks}").fetchone()[0]

    def annotator_names(self, kind: str = "human") -> list[str]:
        rows = self.connection.execute("SELECT name FROM annotators WHERE kind = ? ORDER BY id", (kind,))
        return [row["name"] for row in rows]

    def _require_kind(self, kind: TaskKind) -> None:
        if self.kind != kind:
            raise WrongTaskKind(f"{self.path} labels {self.kind} tasks, not {kind} ones")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock at once, so concurrent writers queue instead of failing."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    # ---- candidates ------------------------------------------------------------------

    def add_candidates(self, prompt: Messages, responses: Sequence[tuple[str, str]], required: int = 1) -> list[int]:
        """Store a prompt's (model, text) responses and pair them up (consecutive responses); returns pair ids."""
        if len(responses) < 2:
            raise ValueError("a pair needs at least two responses")
        self._require_kind("pairwise")
        with self.transaction() as db:
            prompt_id, ids = self._store_responses(db, prompt, responses)
            return [
                db.execute(
                    "INSERT INTO pairs (prompt_id, response_a, response_b, required) VALUES (?, ?, ?, ?)",
                    (prompt_id, first, second, required),
                ).lastrowid
                for first, second in zip(ids, ids[1:])
            ]

    def _store_responses(
        self, db: sqlite3.Connection, prompt: Messages, responses: Sequence[tuple[str, str]]
    ) -> tuple[int, list[int]]:
        """The prompt's id (stored once per store) and the ids of the new response rows."""
        key = json.dumps(list(prompt), ensure_ascii=False, sort_keys=True)
        db.execute("INSERT OR IGNORE INTO prompts (messages, created) VALUES (?, ?)", (key, _now()))
        prompt_id = db.execute("SELECT id FROM prompts WHERE messages = ?", (key,)).fetchone()["id"]
        return prompt_id, [
            db.execute(
                "INSERT INTO responses (prompt_id, model, text, created) VALUES (?, ?, ?, ?)",
                (prompt_id, model, text, _now()),
            ).lastrowid
            for model, text in responses
        ]

    def add_answers(self, prompt: Messages, responses: Sequence[tuple[str, str]], required: int = 1) -> list[int]:
        """Store a prompt's (model, text) responses as single-answer tasks; returns their ids."""
        self._require_kind("single")
        with self.transaction() as db:
            return [
                db.execute("INSERT INTO answers (response_id, required) VALUES (?, ?)", (response, required)).lastrowid
                for response in self._store_responses(db, prompt, responses)[1]
            ]

    def answer(self, answer_id: int) -> Answer | None:
        row = self.connection.execute(
            """SELECT answers.id, prompts.messages, r.text, r.model, answers.required
               FROM answers JOIN responses r ON r.id = answers.response_id JOIN prompts ON prompts.id = r.prompt_id
               WHERE answers.id = ?""",
            (answer_id,),
        ).fetchone()
        if row is None:
            return None
        return Answer(row["id"], tuple(json.loads(row["messages"])), row["text"], row["model"], row["required"])

    def answer_ids(self) -> list[int]:
        return [row["id"] for row in self.connection.execute("SELECT id FROM answers ORDER BY id")]

    def pair(self, pair_id: int) -> Pair | None:
        row = self.connection.execute(
            """SELECT pairs.id, prompts.messages, a.text AS text_a, b.text AS text_b, a.model AS model_a, b.model AS model_b,
                      pairs.required
               FROM pairs JOIN prompts ON prompts.id = pairs.prompt_id
               JOIN responses a ON a.id = pairs.response_a JOIN responses b ON b.id = pairs.response_b
               WHERE pairs.id = ?""",
            (pair_id,),
        ).fetchone()
        if row is None:
            return None
        prompt = tuple(json.loads(row["messages"]))
        return Pair(row["id"], prompt, row["text_a"], row["text_b"], row["model_a"], row["model_b"], row["required"])

    def pair_ids(self) -> list[int]:
        return [row["id"] for row in self.connection.execute("SELECT id FROM pairs ORDER BY id")]

    # ---- annotators ------------------------------------------------------------------

    def add_annotator(self, name: str, kind: Literal["human", "judge"] = "human") -> str | None:
        """Create an annotator; a human gets a sign-in token, returned once (only its hash is stored)."""
        if not name.strip():
            raise UserError("an annotator needs a name")
        token = secrets.token_urlsafe(24) if kind == "human" else None
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO annotators (name, kind, token_hash, created) VALUES (?, ?, ?, ?)",
                    (name, kind, hash_token(token) if token else None, _now()),
                )
        except sqlite3.IntegrityError:
            raise UserError(f"annotator {name!r} already exists") from None
        return token

    def annotator_for_token(self, token: str) -> tuple[int, str] | None:
        """(id, name) of the human annotator with this token, or None."""
        row = self.connection.execute(
            "SELECT id, name FROM annotators WHERE kind = 'human' AND token_hash = ?", (hash_token(token),)
        ).fetchone()
        return (row["id"], row["name"]) if row else None

    def _annotator_id(self, db: sqlite3.Connection, name: str, kind: str) -> int:
        row = db.execute("SELECT id, kind FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            return db.execute(
                "INSERT INTO annotators (name, kind, created) VALUES (?, ?, ?)", (name, kind, _now())
            ).lastrowid
        if row["kind"] != kind:
            raise UserError(
                f"{name!r} is already a {row['kind']} annotator in this store; give the {kind} another name"
            )
        return row["id"]

    # ---- judgements ------------------------------------------------------------------

    def submit(
        self, pair_id: int, annotator_id: int, choice: str, left: str, submission_id: str, comment: str = ""
    ) -> bool:
        """Record a judgement; False when this annotator already stored it under this submission id (a retry).

        Raises SubmissionConflict when the annotator's id names a different judgement.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if left not in ("a", "b"):
            raise ValueError(f"left must be 'a' or 'b', got {left!r}")
        self._require_kind("pairwise")
        with self.transaction() as db:
            earlier = db.execute(
                "SELECT pair_id, choice, comment, left FROM judgements WHERE annotator_id = ? AND submission_id = ?",
                (annotator_id, submission_id),
            ).fetchone()
            if earlier is not None:
                if tuple(earlier) != (pair_id, choice, comment, left):
                    raise SubmissionConflict(f"submission id {submission_id!r} was already used for another judgement")
                return False
            if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise KeyError(pair_id)
            db.execute(
                "UPDATE judgements SET current = NULL WHERE pair_id = ? AND annotator_id = ? AND current = 1",
                (pair_id, annotator_id),
            )
            db.execute(
                "INSERT INTO judgements (pair_id, annotator_id, choice, comment, left, submission_id, current, created) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                (pair_id, annotator_id, choice, comment, left, submission_id, _now()),
            )
        return True

    def submit_verdict(
        self,
        answer_id: int,
        annotator_id: int,
        label: str,
        submission_id: str,
        rating: int | None = None,
        comment: str = "",
    ) -> bool:
        """Record a 👍/👎 verdict on a single answer; False when this annotator already stored it
        under this submission id (a retry). Raises SubmissionConflict when the id names another
        verdict, KeyError for an unknown answer, WrongTaskKind in a pairwise store."""
        if label not in THUMBS:
            raise ValueError(f"label must be one of {THUMBS}, got {label!r}")
        if rating is not None and not (isinstance(rating, int) and 1 <= rating <= 5):
            raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
        self._require_kind("single")
        with self.transaction() as db:
            earlier = db.execute(
                "SELECT answer_id, label, rating, comment FROM verdicts WHERE annotator_id = ? AND submission_id = ?",
                (annotator_id, submission_id),
            ).fetchone()
            if earlier is not None:
                if tuple(earlier) != (answer_id, label, rating, comment):
                    raise SubmissionConflict(f"submission id {submission_id!r} was already used for another verdict")
                return False
            if db.execute("SELECT 1 FROM answers WHERE id = ?", (answer_id,)).fetchone() is None:
                raise KeyError(answer_id)
            self._insert_current_verdict(db, answer_id, annotator_id, label, rating, comment, submission_id)
        return True

    @staticmethod
    def _insert_current_verdict(
        db: sqlite3.Connection,
        answer_id: int,
        annotator_id: int,
        label: str,
        rating: int | None,
        comment: str,
        submission_id: str,
    ) -> None:
        db.execute(
            "UPDATE verdicts SET current = NULL WHERE answer_id = ? AND annotator_id = ? AND current = 1",
            (answer_id, annotator_id),
        )
        db.execute(
            "INSERT INTO verdicts (answer_id, annotator_id, label, rating, comment, submission_id, current, created) "
            "VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            (answer_id, annotator_id, label, rating, comment, submission_id, _now()),
        )

    def record_judge_verdicts(self, judge: str, verdicts: Sequence[tuple[int, str]]) -> None:
        """Store an AI judge's (answer_id, "up" | "down") labels under its name (replacing its earlier ones)."""
        self._require_kind("single")
        with self.transaction() as db:
            judge_id = self._annotator_id(db, judge, "judge")
            for answer_id, label in verdicts:
                self._insert_current_verdict(db, answer_id, judge_id, label, None, "", secrets.token_hex(16))

    def current_verdicts(
        self, kinds: Sequence[str] = ("human",), annotators: Sequence[str] | None = None
    ) -> list[Verdict]:
        """Every annotator's current verdict on every answer, filtered by annotator kind or name."""
        rows = self.connection.execute(
            """SELECT v.answer_id, a.name, a.kind, v.label, v.rating, v.comment, v.created FROM verdicts v
               JOIN annotators a ON a.id = v.annotator_id WHERE v.current = 1 ORDER BY v.answer_id, a.name"""
        ).fetchall()
        return [
            Verdict(*row)
            for row in rows
            if (annotators is not None and row["name"] in annotators) or (annotators is None and row["kind"] in kinds)
        ]

    def verdicts_of(self, annotator_id: int) -> list[dict]:
        """An annotator's own current verdicts (answer, label, rating, comment, time)."""
        rows = self.connection.execute(
            "SELECT answer_id, label, rating, comment, created FROM verdicts WHERE annotator_id = ? AND current = 1 "
            "ORDER BY answer_id",
            (annotator_id,),
        )
        return [dict(row) for row in rows]

    def record_judge(self, judge: str, judgements: Sequence[tuple[int, str]]) -> None:
        """Store an AI judge's (pair_id, choice) labels under the judge's name (replacing its earlier ones)."""
        with self.transaction() as db:
            judge_id = self._annotator_id(db, judge, "judge")
            for pair_id, choice in judgements:
                db.execute(
                    "UPDATE judgements SET current = NULL WHERE pair_id = ? AND annotator_id = ? AND current = 1",
                    (pair_id, judge_id),
                )
                db.execute(
                    "INSERT INTO judgements (pair_id, annotator_id, choice, left, submission_id, current, created) "
                    "VALUES (?, ?, ?, 'a', ?, 1, ?)",
                    (pair_id, judge_id, choice, secrets.token_hex(16), _now()),
                )

    def current_judgements(
        self, kinds: Sequence[str] = ("human",), annotators: Sequence[str] | None = None
    ) -> list[Judgement]:
        """Every annotator's current judgement of every pair, filtered by annotator kind or name."""
        rows = self.connection.execute(
            """SELECT j.pair_id, a.name, a.kind, j.choice, j.comment, j.left, j.created FROM judgements j
               JOIN annotators a ON a.id = j.annotator_id WHERE j.current = 1 ORDER BY j.pair_id, a.name"""
        ).fetchall()
        return [
            Judgement(*row)
            for row in rows
            if (annotators is not None and row["name"] in annotators) or (annotators is None and row["kind"] in kinds)
        ]

    def next_task_id(self, annotator_id: int) -> int | None:
        """The next task (pair or answer, by the store's kind) this annotator has not labelled:
        tasks still short of their required human labels first."""
        tasks, labels, column = TASK_TABLES[self.kind]
        row = self.connection.execute(
            f"""SELECT t.id FROM {tasks} t
               WHERE NOT EXISTS (SELECT 1 FROM {labels} l WHERE l.{column} = t.id AND l.annotator_id = ? AND l.current = 1)
               ORDER BY (SELECT COUNT(*) FROM {labels} l JOIN annotators a ON a.id = l.annotator_id
                         WHERE l.{column} = t.id AND l.current = 1 AND a.kind = 'human') >= t.required, t.id
               LIMIT 1""",
            (annotator_id,),
        ).fetchone()
        return row["id"] if row else None

    def progress(self, annotator_id: int) -> tuple[int, int]:
        """(tasks this annotator has labelled, all tasks), for the store's kind."""
        tasks, labels, _ = TASK_TABLES[self.kind]
        done = self.connection.execute(
            f"SELECT COUNT(*) FROM {labels} WHERE annotator_id = ? AND current = 1", (annotator_id,)
        ).fetchone()[0]
        return done, self.connection.execute(f"SELECT COUNT(*) FROM {tasks}").fetchone()[0]

    def judgements_of(self, annotator_id: int) -> list[dict]:
        """An annotator's own current judgements (pair, choice, comment, left side, time)."""
        rows = self.connection.execute(
            "SELECT pair_id, choice, comment, left, created FROM judgements WHERE annotator_id = ? AND current = 1 ORDER BY pair_id",
            (annotator_id,),
        )
        return [dict(row) for row in rows]

    def history(self, pair_id: int, annotator_id: int) -> list[str]:
        """An annotator's choices for a pair, oldest first (the last is the current one)."""
        rows = self.connection.execute(
            "SELECT choice FROM judgements WHERE pair_id = ? AND annotator_id = ? ORDER BY id", (pair_id, annotator_id)
        )
        return [row["choice"] for row in rows]
