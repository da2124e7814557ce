"""Atomic writes: a file or directory is either whole or absent, never half-written."""

from __future__ import annotations

import json
import os
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


def write_json_atomically(target: Path, value: Any) -> None:
    write_text_atomically(target, json.dumps(value, indent=2, default=str) + "\n")


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
