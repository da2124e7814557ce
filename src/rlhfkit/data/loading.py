"""Read dataset rows from local files, saved `datasets` dirs, the hub, or the built-in data.

Every row keeps where it came from (``file.jsonl:12``) so a bad row can be named in the error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.config import BUILTIN_PREFIX, DataSettings
from rlhfkit.errors import DataError

BUILTIN_DATASETS = {
    "tutor-corpus": ("tutor_corpus_train.jsonl", "tutor_corpus_eval.jsonl"),
    "tutor-sft": ("tutor_sft_train.jsonl", "tutor_sft_eval.jsonl"),
    "tutor-prefs": ("tutor_prefs_train.jsonl", "tutor_prefs_eval.jsonl"),
    "arithmetic": ("arithmetic_train.jsonl", "arithmetic_eval.jsonl"),
    "two-digit-arithmetic": ("two_digit_arithmetic_train.jsonl", "two_digit_arithmetic_eval.jsonl"),
}


EXTRA_FIELDS = "(fields beyond the header)"  # a CSV row's key for what its header has no names for


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    where: str  # "path:line" (jsonl), "path:row N" (csv/json/parquet), "name[split] row N" (datasets)


@dataclass(frozen=True)
class DataSplits:
    train: list[Row]
    eval: list[Row]
    eval_parts: dict[str, list[Row]]  # each source's held-out rows (what `eval` joins)
    weighted_copies: int = 0  # training rows that data.mix weights added beyond each source's own


def builtin_file(name: str) -> tuple[Path, Path]:
    """Paths of the train and eval files of a built-in dataset."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {BUILTIN_PREFIX}{name}; available: {', '.join(BUILTIN_DATASETS)}")
    folder = resources.files("rlhfkit") / "data" / "builtin"
    train_name, eval_name = BUILTIN_DATASETS[name]
    return Path(str(folder / train_name)), Path(str(folder / eval_name))


def _detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            return "saved"
        raise DataError(f"{path}: a directory, but not a saved `datasets` directory (no dataset_info.json)")
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if path.endswith(suffix):
            return suffix[1:]
    if local.exists():
        raise DataError(f"{path}: cannot tell the format from the name; set data.format")
    return "hub"


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) opens the first line
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(value).__name__}")
            rows.append(Row(value, where))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} wrapper
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    rows = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: row {index}: expected an object, got {type(item).__name__}")
        rows.append(Row(item, f"{path}: row {index}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            # Row numbers count the header as line 1, as a spreadsheet does. Fields beyond the
            # header are kept under EXTRA_FIELDS, for the row check to name.
            reader = csv.DictReader(handle, restkey=EXTRA_FIELDS)
            return [Row(dict(item), f"{path}:{number}") for number, item in enumerate(reader, start=2)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from None


def _rows_from_dataset(dataset: Any, label: str) -> list[Row]:
    return [Row(dict(item), f"{label} row {index}") for index, item in enumerate(dataset)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return [Row(item, f"{path}: row {index}") for index, item in enumerate(table.to_pylist())]


def _read_saved(path: Path, split: str) -> list[Row]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return _rows_from_dataset(loaded, f"{path}[{split}]")


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, missing split: all user-facing
        raise DataError(f"cannot load hub dataset {name!r} split {split!r}: {exc}") from None
    return _rows_from_dataset(loaded, f"{name}[{split}]")


def read_rows(
    path: str, data_format: str = "auto", split: str = "train", columns: dict[str, str] | None = None
) -> list[Row]:
    """All rows of one data source, with columns renamed to the names rlhfkit expects."""
    kind = _detect_format(path, data_format)
    local = Path(path).expanduser()
    if kind != "hub" and not local.exists():
        raise DataError(f"data file does not exist: {path}")
    readers = {
        "jsonl": lambda: _read_jsonl(local),
        "json": lambda: _read_json(local),
        "csv": lambda: _read_csv(local),
        "parquet": lambda: _read_parquet(local),
        "saved": lambda: _read_saved(local, split),
        "hub": lambda: _read_hub(path, split),
    }
    rows = readers[kind]()
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    if columns:
        rows = [_rename(row, columns) for row in rows]
    return rows


def _rename(row: Row, columns: dict[str, str]) -> Row:
    values = dict(row.values)
    for expected, actual in columns.items():
        if actual in values:
            values[expected] = values.pop(actual)
    return Row(values, row.where)


def load_splits(settings: DataSettings, seed: int) -> DataSplits:
    """Train and held-out rows of path and of each data.mix source, joined.

    Each source is split on its own (its built-in eval file, eval_split, or a seeded eval_fraction)
    unless eval_path holds the held-out rows of all of them; `eval_parts` keeps each source's
    held-out rows apart, under the source as written. A mixed source's training rows count
    `weight` times (weights only repeat or thin out training rows, never held-out ones).
    """
    train: list[Row] = []
    eval_parts: dict[str, list[Row]] = {}
    weighted_copies = 0
    for source, weight in {settings.path: 1.0, **settings.mix}.items():
        source_train, eval_parts[source] = _source_splits(settings, source, seed)
        weighted = _weighted(source_train, weight, seed)
        weighted_copies += max(len(weighted) - len(source_train), 0)
        train += weighted
    if settings.eval_path is not None:
        eval_parts = {
            settings.eval_path: read_rows(
                settings.eval_path, "auto", settings.eval_split or settings.split, settings.columns
            )
        }
    if settings.part is not None:
        index, count = (int(number) for number in settings.part.split("/"))
        train = [row for row in train if part_of(row.values, count) == index - 1]
    if settings.max_examples is not None:
        train = train[: settings.max_examples]
    if not train:
        kept = f" and keeping part {settings.part}" if settings.part else ""
        raise DataError(f"{settings.path}: no training rows left after holding out the eval split{kept}")
    held_out = [row for rows in eval_parts.values() for row in rows]
    return DataSplits(train, held_out, eval_parts, weighted_copies)


def source_labels(sources: list[str]) -> dict[str, str]:
    """Short names for data sources in metric keys: each as written, less the directory all of
    them share (../data/hh/pairs.jsonl and ../data/oasst/pairs.jsonl: hh/pairs.jsonl, oasst/pairs.jsonl)."""
    try:
        shared = os.path.commonpath(sources) if len(sources) > 1 else ""
    except ValueError:  # absolute and relative paths mixed
        shared = ""
    labels = {source: source[len(shared) :].lstrip("/") if shared else source for source in sources}
    return labels if all(labels.values()) and len(set(labels.values())) == len(labels) else {s: s for s in sources}


def row_key(row: Row) -> str:
    """A row's values as one string: rows with equal keys are copies of each other."""
    return json.dumps(row.values, sort_keys=True, default=str)


def _weighted(rows: list[Row], weight: float, seed: int) -> list[Row]:
    """The rows `int(weight)` times, then a seeded share of them for what weight has beyond that."""
    whole, fraction = divmod(weight, 1.0)
    share = sorted(random.Random(seed).sample(range(len(rows)), round(len(rows) * fraction)))
    return rows * int(whole) + [rows[index] for index in share]


def _source_splits(settings: DataSettings, source: str, seed: int) -> tuple[list[Row], list[Row]]:
    """One source's training rows and its own held-out rows (none when eval_path replaces them)."""
    if source.startswith(BUILTIN_PREFIX):
        train_file, eval_file = builtin_file(source[len(BUILTIN_PREFIX) :])
        train = read_rows(str(train_file), "jsonl", columns=settings.columns)
        if settings.eval_path is None:
            return train, read_rows(str(eval_file), "jsonl", columns=settings.columns)
        return train, []
    train = read_rows(source, settings.format, settings.split, settings.columns)
    if settings.eval_path is not None:
        return train, []
    if settings.eval_split is not None:
        return train, read_rows(source, settings.format, settings.eval_split, settings.columns)
    return _fraction_split(train, settings.eval_fraction, seed)


def _fraction_split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded share of the rows held out, every copy of a row on the same side: a file that
    repeats a problem (MAWPS repeats 31) must not have it held out and trained on."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(rows) * fraction)
    if fraction > 0 and n_eval == 0 and len(rows) > 1:
        n_eval = 1
    keys = [row_key(row) for row in rows]
    copies = Counter(keys)
    held_out_keys: set[str] = set()
    held_out_count = 0
    for index in order:
        if held_out_count >= n_eval:
            break
        if keys[index] not in held_out_keys:
            held_out_keys.add(keys[index])
            held_out_count += copies[keys[index]]
    train = [row for row, key in zip(rows, keys, strict=True) if key not in held_out_keys]
    return train, [row for row, key in zip(rows, keys, strict=True) if key in held_out_keys]


def part_of(values: dict[str, Any], count: int) -> int:
    """Which of `count` parts a row belongs to: a hash of its prompt (of the whole row when it has
    none), so rows about one prompt share a part and no seed or run order moves a row."""
    key = values.get("prompt", values)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count
