"""A stage's output directory: run.json, config.yaml, checkpoints/, final/ and the metrics files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from rlhfkit import __version__
from rlhfkit.config import StageConfig, dump_config
from rlhfkit.engine.distributed import process_state
from rlhfkit.errors import UserError
from rlhfkit.files import clean_stale_temporaries, write_json_atomically, write_text_atomically
from rlhfkit.models import FINAL_DIR, RUN_MARKER

CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
METRICS_LOG = "metrics.jsonl"
# Settings a resumed run may change: where it runs, writes, logs and checkpoints, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {
        "train.output_dir",
        "train.trackers",
        "train.tracker_project",
        "train.log_every",
        "train.save_every",
        "train.save_limit",
        "train.eval_every",
        "model.device",
    }
)


class RunDir:
    """A stage's output directory: run.json, config.yaml, checkpoints/, final/, metrics."""

    def __init__(self, root: Path, main: bool = True) -> None:
        self.root = root
        self.main = main  # only the main process of a launch writes

    @classmethod
    def open(cls, output_dir: str, stage: str, config: StageConfig, resume: bool) -> RunDir:
        """Create a run dir, or reopen one to resume; never overwrite a run that is there.

        Every process of a launch checks; the main one writes, and the others wait for it.
        """
        state = process_state(config.model.device)
        run = cls(Path(output_dir).expanduser(), state.is_main_process)
        with state.main_process_first():
            if state.is_main_process:
                run._open(stage, config, resume)
        return run

    @classmethod
    def start_untrained(cls, output_dir: str, stage: str, config: Any) -> RunDir:
        """The run dir of a stage that trains nothing (evaluate, label): created if need be, its
        config.yaml written and its marker set to running. What it held is the stage's to keep or
        replace (an evaluation writes anew; the label stage keeps its store)."""
        run = cls(Path(output_dir).expanduser())
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"output_dir {run.root} is not writable: {exc.strerror}") from None
        write_text_atomically(run.root / "config.yaml", dump_config(config))
        run.write_marker(stage, "running", starting=True)
        return run

    def _open(self, stage: str, config: StageConfig, resume: bool) -> None:
        marker = self.root / RUN_MARKER
        holds_work = self.checkpoint_dirs() or (self.root / FINAL_DIR).exists()
        if marker.exists() and not resume:
            if holds_work:
                raise UserError(
                    f"{self.root} already holds a run; pass --resume to continue it, or choose another train.output_dir"
                )
            # A run that stopped before its first checkpoint has nothing to keep: start it afresh.
            print(f"note: {self.root} holds a run that stopped before its first checkpoint; starting it again")
            for stale in (METRICS_LOG, "metrics.json"):
                (self.root / stale).unlink(missing_ok=True)
        if resume and not marker.exists():
            raise UserError(f"--resume: {self.root} holds no run to resume")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"train.output_dir {self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"train.output_dir {self.root} is not writable: {exc.strerror}") from None
        if resume:
            recorded = json.loads(marker.read_text())
            if recorded.get("stage") != stage:
                raise UserError(f"--resume: {self.root} is a {recorded.get('stage')} run, not a {stage} run")
            self._check_same_config(config)
        write_text_atomically(self.root / "config.yaml", dump_config(config))
        self.write_marker(stage, "running", starting=not resume)
        clean_stale_temporaries(self.root)
        clean_stale_temporaries(self.root / CHECKPOINTS)

    def _check_same_config(self, config: StageConfig) -> None:
        """A resumed run must continue what it started: any setting but where it runs, logs and
        checkpoints must be the one in its config.yaml (which resuming would overwrite)."""
        saved_path = self.root / "config.yaml"
        try:
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) if saved_path.exists() else None
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            saved = None
        if not isinstance(saved, dict):
            return  # nothing readable to compare with; the checkpoint's own checks still apply
        before, now = _flatten(saved), _flatten(yaml.safe_load(dump_config(config)))
        changed = sorted(
            key
            for key in before.keys() | now.keys()
            if before.get(key) != now.get(key) and key not in RESUMABLE_CHANGES
        )
        if changed:
            shown = "; ".join(f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise UserError(
                f"--resume: the config differs from the one {self.root} was started with ({shown}{more}); "
                f"resume with {saved_path}, or start a new run in another train.output_dir"
            )

    def write_marker(self, stage: str, status: str, starting: bool | None = None) -> None:
        """run.json: the stage and its status, and what a figure from this run needs to be
        reproduced — the command, the package versions and machine (when the run starts), when it
        started, was resumed and finished. starting: True for a new run, False for a resumed one.

        A resume also records when the run last wrote anything before it (`stopped`), so the time
        it lay stopped can be told from the time it ran."""
        if not self.main:
            return
        now = datetime.now(timezone.utc).isoformat()
        record = {} if starting else self.read_json(RUN_MARKER)
        if starting is False:
            record["stopped"] = [*record.get("stopped", []), self.last_written(record.get("updated", now))]
            record["resumed"] = [*record.get("resumed", []), now]
        record.update({"stage": stage, "status": status, "rlhfkit": __version__, "updated": now})
        if starting:
            record.update({"started": now, "command": command_line(), "environment": environment()})
        if status == "complete":
            record["finished"] = now
        write_json_atomically(self.root / RUN_MARKER, record)

    def last_written(self, default: str) -> str:
        """When the run last wrote a file (its metrics, logs or checkpoints), as ISO time; `default` if
        it wrote none. run.json and config.yaml do not count: opening a run rewrites them."""
        times = [
            path.stat().st_mtime
            for path in self.root.rglob("*")
            if path.is_file() and not (path.parent == self.root and path.name in (RUN_MARKER, "config.yaml"))
        ]
        return datetime.fromtimestamp(max(times), timezone.utc).isoformat() if times else default

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (incomplete ones are hidden temporaries)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("step-*") if (p / CHECKPOINT_STATE).exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def read_json(self, name: str) -> dict:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else {}

    def update_json(self, name: str, **values) -> None:
        if not self.main:
            return
        write_json_atomically(self.root / name, {**self.read_json(name), **values})


def command_line() -> str:
    """The command this process runs, as a shell would take it back."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


# Matrix instructions, widest first: the CPU kernels that run (so float32 throughput, whether bf16
# products exist, and the rounding that decides near-tie draws) follow the widest one present.
CPU_MATRIX_INSTRUCTIONS = (
    ("amx_bf16", "AMX-BF16"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
)


def widest_matrix_instructions(flags: set[str]) -> str | None:
    """The widest matrix instruction set among a CPU's flags (/proc/cpuinfo), None if none listed."""
    return next((name for flag, name in CPU_MATRIX_INSTRUCTIONS if flag in flags), None)


def environment() -> dict[str, Any]:
    """Versions and machine a run's figures depend on."""
    import torch

    packages = {}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    cpuinfo = _cpuinfo()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
    )
    machine = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    if instructions := widest_matrix_instructions(set(flags)):
        machine["cpu_instructions"] = instructions
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"python": platform.python_version(), **packages, **machine}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
