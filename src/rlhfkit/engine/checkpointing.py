"""Checkpoints on disk: trainable weights, optimizer, scheduler, RNG and progress, each whole.

A checkpoint is RUN/checkpoints/step-NNNNNN/ with trainable.safetensors, optimizer.pt,
scheduler.pt and state.json. The directory is written atomically and state.json last, so a
checkpoint is complete or out of sight; only the newest train.save_limit are kept. Tensors are
whole (shards gathered before writing), so a run saved under N processes resumes under M.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhfkit.engine import deepspeed_zero
from rlhfkit.engine.distributed import like_parameter
from rlhfkit.engine.run_dir import CHECKPOINT_STATE, RunDir
from rlhfkit.errors import TrainingError, UserError
from rlhfkit.files import json_text, remove_dir_atomically, write_dir_atomically
from rlhfkit.models import whole_tensor


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_checkpoint(
    run: RunDir,
    target: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    state: dict[str, Any],
    save_limit: int,
) -> None:
    """Write one checkpoint (state: progress, total_steps, extra; the RNG state is added here), then
    drop the oldest beyond save_limit. A failed write keeps the previous checkpoints and says so."""

    def write(tmp: Path) -> None:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        # state.json is written last: its presence marks a checkpoint as complete.
        (tmp / CHECKPOINT_STATE).write_text(json_text({**state, "rng": rng_state()}))

    try:
        write_dir_atomically(target, write)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        previous = run.checkpoint_dirs()
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        reason = getattr(exc, "strerror", None) or exc
        raise TrainingError(f"could not write checkpoint {target}: {reason}{kept}") from None
    for stale in run.checkpoint_dirs()[:-save_limit]:
        remove_dir_atomically(stale)  # a kill mid-way must not leave a half-deleted checkpoint


@dataclass
class SavedCheckpoint:
    path: Path
    state: dict[str, Any]  # state.json: progress, total_steps, extra, rng
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict


def read_checkpoint(run: RunDir, checkpoint: Path | None, total_steps: int) -> SavedCheckpoint:
    """Everything a checkpoint holds; by default the latest complete one that reads back whole.

    A damaged latest checkpoint (a truncated weights file, a broken state.json, e.g. after a
    full disk) is passed over, saying so, for the one before it. One written for another number
    of total steps is refused: the schedule would not continue.
    """
    candidates = [checkpoint] if checkpoint is not None else run.checkpoint_dirs()[::-1]
    if not candidates:
        raise UserError(f"--resume: {run.checkpoints} holds no complete checkpoint")
    for index, path in enumerate(candidates):
        if not (path / CHECKPOINT_STATE).exists() or not (path / "trainable.safetensors").exists():
            raise UserError(f"{path} is not an rlhfkit checkpoint (no {CHECKPOINT_STATE} / trainable.safetensors)")
        try:
            saved = SavedCheckpoint(
                path,
                json.loads((path / CHECKPOINT_STATE).read_text()),
                load_file(str(path / "trainable.safetensors")),
                read_torch_state(path / "optimizer.pt"),
                read_torch_state(path / "scheduler.pt"),
            )
            if missing := {"progress", "rng", "total_steps"} - set(saved.state):
                raise ValueError(f"{CHECKPOINT_STATE} lacks {', '.join(sorted(missing))}")
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, SafetensorError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'incomplete'}"
            if index + 1 == len(candidates):
                raise UserError(
                    f"--resume: checkpoint {path} is damaged ({reason}) and no earlier one is whole"
                ) from None
            print(f"warning: checkpoint {path} is damaged ({reason}); resuming from {candidates[index + 1]} instead")
            continue
        if saved.state["total_steps"] != total_steps:
            raise UserError(
                f"{path} was written for {saved.state['total_steps']} total steps, this config gives "
                f"{total_steps}; resume with the same data and train settings"
            )
        return saved
    raise AssertionError("unreachable")


def read_torch_state(path: Path) -> dict:
    """A state dict saved with torch.save, read with weights_only: tensors and plain containers only.

    A file that would need arbitrary objects unpickled (which can run code) is refused.
    """
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path}: refused: it holds more than tensors and plain values ({str(exc).splitlines()[0]})"
        ) from None


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole tensors on the CPU (gathered from every process's shards under FSDP or ZeRO-3).

    Every process must call it (gathering is collective); the same on each afterwards.
    """
    # A tied weight (e.g. head = embeddings) is one parameter: saved once, under its first name.
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    with deepspeed_zero.gathered(list(model.parameters())):  # a copy: the gathered weights are freed after
        return {
            name: whole_tensor(value).detach().cpu().clone().contiguous()
            for name, value in model.state_dict().items()
            if name in names
        }


def whole_training_state(
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    wrapped: torch.nn.Module,
    zero_stage: int | None,
    sharded: bool,
    decay_groups: list[list[torch.nn.Parameter]],
) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimizer state) on the CPU, FSDP shards and ZeRO partitions gathered whole."""
    if zero_stage:
        return deepspeed_zero.whole_weights(trainable), deepspeed_zero.whole_optimizer_state(wrapped, decay_groups)
    weights = {name: whole_tensor(p).detach().contiguous().cpu() for name, p in trainable.items()}
    optimizer_state = optimizer.state_dict()
    if sharded:
        optimizer_state["state"] = {
            index: {key: whole_tensor(value).cpu() for key, value in entry.items()}
            for index, entry in optimizer_state["state"].items()
        }
    return weights, optimizer_state


def restore_training_state(
    trainable: dict[str, torch.nn.Parameter],
    saved: dict[str, torch.Tensor],
    optimizer_state: dict,
    optimizer: torch.optim.Optimizer,
    wrapped: torch.nn.Module,
    zero_stage: int | None,
    sharded: bool,
    decay_groups: list[list[torch.nn.Parameter]],
) -> None:
    """Put saved whole tensors back: each process keeps its shard (FSDP) or partition (ZeRO) of them."""
    if zero_stage:
        deepspeed_zero.set_whole_weights(trainable, saved)
        deepspeed_zero.set_whole_optimizer_state(wrapped, decay_groups, optimizer_state)
        return
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(like_parameter(saved[name], parameter))
    if sharded:
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer_state["state"] = {
            index: {
                key: like_parameter(value, by_index[index]) if value.dim() else value for key, value in entry.items()
            }
            for index, entry in optimizer_state["state"].items()
        }
    optimizer.load_state_dict(optimizer_state)
