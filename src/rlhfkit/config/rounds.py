"""Names of a pipeline's rounds: round 1 of a stage is STAGE in OUTPUT_DIR/STAGE, round r ≥ 2 is
STAGE@r in OUTPUT_DIR/round-r/STAGE (the loop of `pipeline.rounds`)."""

from __future__ import annotations

from pathlib import Path


def round_key(stage: str, round_number: int) -> str:
    """How a stage's run in a round is named in configs, timings, results and the report."""
    return stage if round_number == 1 else f"{stage}@{round_number}"


def stage_of(key: str) -> str:
    return key.partition("@")[0]


def round_of(key: str) -> int:
    return int(key.partition("@")[2] or 1)


def round_output(root: str | Path, stage: str, round_number: int) -> Path:
    return Path(root) / stage if round_number == 1 else Path(root) / f"round-{round_number}" / stage
