"""`rlhfkit pipeline`: run the listed stages in order, each from the previous stage's output.

A run directory holds one subdirectory per stage. A stage whose run is complete is skipped, one
that was interrupted after a checkpoint resumes from it, and one that stopped before its first
checkpoint starts again; `--from STAGE` re-runs that stage and every later one, `--only STAGE`
just that one (the earlier output is kept beside it as STAGE.previous). With `pipeline.rounds`,
the loop's stages run once per round (STAGE@r, in OUTPUT_DIR/round-r/); `--from` and `--only`
name a stage, which covers its run in every round. The report is rewritten at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from rlhfkit import registry
from rlhfkit.config import dump_config
from rlhfkit.config.loading import load_pipeline
from rlhfkit.config.rounds import stage_of
from rlhfkit.errors import UserError
from rlhfkit.files import read_json_or_empty, write_json_atomically, write_text_atomically
from rlhfkit.models import RUN_MARKER

StageStatus = Literal["missing", "complete", "resumable", "restart"]


def stage_status(directory: Path) -> StageStatus:
    """What is in a stage's directory: nothing, a complete run, a run to resume, or a run to start again."""
    marker = directory / RUN_MARKER
    if not marker.exists():
        return "missing"
    try:
        status = json.loads(marker.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return "restart"
    if status == "complete":
        return "complete"
    from rlhfkit.engine import RunDir

    return "resumable" if RunDir(directory).checkpoint_dirs() else "restart"


def set_aside(directory: Path) -> None:
    """Move a stage's earlier output to STAGE.previous (replacing an older one) before re-running it."""
    previous = directory.with_name(directory.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    directory.rename(previous)
    print(f"pipeline: moved the earlier {directory.name} output to {previous}")


def stages_to_rerun(keys: list[str], from_stage: str | None, only: str | None) -> set[str]:
    """The runs (keys, in run order) that --from / --only name: a stage's run in every round."""
    stages = list(dict.fromkeys(stage_of(key) for key in keys))
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise UserError(f"{flag} {value}: not a stage of this pipeline ({', '.join(stages)})")
    if from_stage is not None and only is not None:
        raise UserError("give --from or --only, not both")
    if only is not None:
        return {key for key in keys if stage_of(key) == only}
    if from_stage is not None:
        first = next(index for index, key in enumerate(keys) if stage_of(key) == from_stage)
        return set(keys[first:])
    return set()


def run_pipeline(
    path: str | Mapping[str, Any],
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    label: str = "(python)",
) -> tuple[Path, dict[str, Any]]:
    """Run (or finish) the pipeline in `path` (a YAML file or the same tree as a mapping);
    returns the run directory and every stage's validated config."""
    pipeline, configs = load_pipeline(path, overrides, label)  # every stage's config is validated first
    rerun = stages_to_rerun(list(configs), from_stage, only)
    root = Path(pipeline.output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        root / "pipeline.yaml",
        "# The resolved config of every stage, as this pipeline ran them.\n" + resolved_yaml(configs),
    )
    selected = [key for key in configs if not only or stage_of(key) == only]
    timings = read_json_or_empty(root / "timings.json")
    for number, stage in enumerate(selected, start=1):  # `stage` is the run's key: STAGE, or STAGE@r in round r
        config = configs[stage]
        directory = registry.stage(stage_of(stage)).output_dir(config)
        status = stage_status(directory)
        if stage in rerun and status != "missing":
            set_aside(directory)
            status = "missing"
        if status == "complete":
            print(f"pipeline [{number}/{len(selected)}] {stage}: complete in {directory}, skipped")
            continue
        action = {"missing": "running", "restart": "starting again", "resumable": "resuming"}[status]
        print(f"pipeline [{number}/{len(selected)}] {stage}: {action} -> {directory}")
        started = time.perf_counter()
        registry.stage(stage_of(stage)).runner(config, resume=status == "resumable")
        timings[stage] = time.perf_counter() - started  # of this run: a resumed stage counts from its resume
        write_json_atomically(root / "timings.json", timings)
    from rlhfkit.report import write_report

    report = write_report(
        root, {key: registry.stage(stage_of(key)).output_dir(config) for key, config in configs.items()}
    )
    print(f"pipeline: report written to {report}")
    return root, configs


def resolved_yaml(configs: dict[str, Any]) -> str:
    """Every stage's validated config, paths filled in, as one YAML document."""
    return "".join(
        f"{stage}:\n" + "".join(f"  {line}\n" for line in dump_config(config).splitlines())
        for stage, config in configs.items()
    )
