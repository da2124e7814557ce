"""Atomic writes (a file or directory is either whole or absent, never half-written) and the JSON
every rlhfkit file holds (standard JSON: a NaN or infinite number is written as null)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_dir) in target's parent, then rename tmp_dir to target.

    An interrupted write leaves only hidden ``.NAME.tmp-*`` directories (the new one, or the
    replaced one moved aside), which readers ignore and clean_stale_temporaries removes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _fsync_dir_tree(tmp)
        if target.exists():
            replaced = target.with_name(f".{target.name}.tmp-replaced-{os.getpid()}")
            target.rename(replaced)
            tmp.rename(target)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_file(first: Path, second: Path) -> bool:
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def check_output_files(outputs: Sequence[Path], inputs: Sequence[Path], what: str) -> None:
    """Refuse output files that are directories or any of the command's inputs, before anything is written.

    An atomic write replaces whatever the path holds, so writing over an input (a labeling store,
    the data being scored) would destroy it. Inputs include their SQLite sidecars (-wal, -shm).
    """
    sidecars = [input.with_name(input.name + suffix) for input in inputs for suffix in ("-wal", "-shm", "-journal")]
    for output in outputs:
        if output.is_dir():
            raise UserError(f"{what} {output}: is a directory; name a file to write")
        for source in [*inputs, *sidecars]:
            if _same_file(output, source):
                raise UserError(f"{what} {output}: is an input of this command ({source}); writing it would destroy it")


def write_text_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_json_or_empty(path: Path) -> dict:
    """A JSON file written by rlhfkit, or {} when it is absent or unreadable (e.g. cut short by a crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_local_path(reference: str) -> bool:
    """Whether a model reference names a local path rather than a hub id ("org/name").

    Paths that start with ., / or ~, end in .gguf, hold more than one slash or a backslash, or
    whose first part is a directory here (runs/sft) are local: a missing one is named as a missing
    path, never sent to the hub as a malformed repo id.
    """
    if reference.startswith((".", "/", "~")) or reference.endswith(".gguf") or not HUB_ID.fullmatch(reference):
        return True
    first, slash, _ = reference.partition("/")
    return bool(slash) and Path(first).is_dir()


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """`value` as standard JSON, which has no NaN or Infinity: Python's json module would write
    them bare, and most readers (browsers, jq, pandas' strict mode) then refuse the whole file.
    A statistic that is not a number is written as null."""
    return json.dumps(finite_or_null(value), indent=indent, ensure_ascii=False, allow_nan=False, default=str)


def write_json_atomically(target: Path, value: Any) -> None:
    write_text_atomically(target, json_text(value, indent=2) + "\n")


def _fsync_dir_tree(root: Path) -> None:
    """Flush file contents to disk before the rename makes them visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def remove_dir_atomically(target: Path) -> None:
    """Delete a directory so that an interruption leaves it either whole or out of sight.

    It is first renamed to a hidden temporary (one atomic step), then deleted: a process killed
    while deleting leaves a ``.NAME.tmp-removed`` directory for clean_stale_temporaries, never a
    half-deleted NAME that readers would take for a damaged one.
    """
    hidden = target.with_name(f".{target.name}.tmp-removed")
    shutil.rmtree(hidden, ignore_errors=True)
    target.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def clean_stale_temporaries(folder: Path) -> None:
    """Remove leftovers of interrupted atomic writes and removals.

    A directory moved aside for a replacement that never landed (the process died between the two
    renames of write_dir_atomically) is put back instead, so a crash never loses both versions.
    """
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp-*"):
        name, _, kind = path.name[1:].rpartition(".tmp-")
        original = folder / name
        try:
            if kind.startswith("replaced-") and not original.exists():
                path.rename(original)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass  # another process of the same launch cleaned it first
