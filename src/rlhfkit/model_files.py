"""What can be wrong with a model folder, said in one line naming the path.

transformers, safetensors and torch report a damaged or hostile model folder in their own
terms (a Rust error type, a RuntimeError asking for `ignore_mismatched_sizes`, a pickle error,
or nothing at all for a missing tensor); these turn each into a UserError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from rlhfkit.errors import UserError


@contextmanager
def reading_model_files(what: str, path: Any) -> Iterator[None]:
    """Turn transformers' load failures into one-line errors naming the path: files that are not
    what they say (a cut-short safetensors file, a fake GGUF), weights of the wrong shapes, and a
    pickle that holds more than tensors (torch refuses to run it; we say so)."""
    import pickle

    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot load {what} from {path}: {exc}") from None
    except pickle.UnpicklingError:
        raise UserError(
            f"cannot load {what} from {path}: its pickle (.bin) file holds code, not only tensors, and is not run; "
            "use the model's safetensors weights"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise UserError(
                f"{path} ships its own modelling code, which rlhfkit runs only with model.trust_remote_code: true "
                "(read that code first)"
            ) from None
        if "GGUF" in str(exc) or "gguf" in str(exc):
            raise UserError(f"cannot load {what} from {path}: not a GGUF file this reader takes ({exc})") from None
        raise
    except RuntimeError as exc:
        if "mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            raise UserError(
                f"cannot load {what} from {path}: its weights do not have the shapes its config.json describes"
            ) from None
        raise
    except SafetensorError as exc:
        raise UserError(f"cannot load {what} from {path}: a damaged safetensors file ({exc})") from None


def refuse_missing_weights(path: Any, info: dict) -> None:
    """A checkpoint without some of the model's weights would load with those initialised at
    random (and a different model on every load): refuse it, naming them."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"{path}: the weights lack {len(missing)} tensor(s) the model needs ({shown}); it is incomplete"
        )


def base_after_a_move(adapter_dir: Path, recorded: str, info_file: Path) -> str:
    """The base model an adapter names — or, when that is an absolute path that no longer exists
    and the adapter's info file holds the base's place relative to the adapter (`base_relative`),
    the base found there: an adapter and its base moved together (a pipeline's run directory
    renamed or copied to another machine) still resolve."""
    if not Path(recorded).is_absolute() or Path(recorded).exists() or not info_file.is_file():
        return recorded
    relative = json.loads(info_file.read_text()).get("base_relative")
    moved = (adapter_dir / relative).resolve() if isinstance(relative, str) else None
    return str(moved) if moved is not None and moved.exists() else recorded
