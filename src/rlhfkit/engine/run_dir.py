"""A stage's output directory: run.json, config.yaml, checkpoints/, final/ and the metrics files."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from rlhfkit import __version__
from rlhfkit.config import StageConfig, dump_config
from rlhfkit.engine.distributed import process_state
from rlhfkit.errors import UserError
from rlhfkit.files import clean_stale_temporaries, write_json_atomically, write_text_atomically
from rlhfkit.models import FINAL_DIR, RUN_MARKER

CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
METRICS_LOG = "metrics.jsonl"


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
        write_text_atomically(self.root / "config.yaml", dump_config(config))
        self.write_marker(stage, "running")
        clean_stale_temporaries(self.root)
        clean_stale_temporaries(self.root / CHECKPOINTS)

    def write_marker(self, stage: str, status: str) -> None:
        if not self.main:
            return
        write_json_atomically(
            self.root / RUN_MARKER,
            {
                "stage": stage,
                "status": status,
                "rlhfkit": __version__,
                "updated": datetime.now(timezone.utc).isoformat(),
            },
        )

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
