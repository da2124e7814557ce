"""Launching rlhfkit under `accelerate launch` from tests (2 CPU processes over gloo, or GPUs), and reading what the runs logged."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rlhfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def settings(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


def launch(
    processes: int,
    stage: str,
    *pairs: str,
    resume: bool = False,
    launch_config: str = "cpu.yaml",
    launcher: tuple[str, ...] = (),
) -> None:
    """One stage run on `processes` processes; the 1-process run goes through the CLI in-process."""
    # model.device stays auto (CPU here): accelerate must still see a CPU launch, not N lone processes.
    arguments = [stage, *settings("train.trackers=[]", *pairs)] + (["--resume"] if resume else [])
    if processes == 1:
        assert main(arguments) == 0
        return
    done = accelerate_launch(processes, arguments, launch_config, launcher)
    assert done.returncode == 0, failure_report(done.stderr)


def failure_report(stderr: str) -> str:
    """What a failed launch said: the first process traceback (the cause; the launcher's own
    report comes last and names only exit codes), any abort message, and the end."""
    first = stderr.find("Traceback")
    aborts = [line for line in stderr.splitlines() if "terminate called" in line or "Fatal Python error" in line]
    cause = stderr[first : first + 4000] if first >= 0 else ""
    return "\n".join([cause, *aborts, "... end of stderr:", stderr[-2000:]])


def accelerate_launch(
    processes: int, arguments: list[str], launch_config: str = "cpu.yaml", launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`accelerate launch` of the CLI with a shipped launch config (on a port made free for the test)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate" / launch_config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        *launcher,
        "-m",
        "rlhfkit.cli",
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return run_bounded(command, env=environment)


LAUNCH_SECONDS = 300  # a 2-process launch on the tiny model takes 10-40 s on 2 CPU cores


def run_bounded(command: list[str], seconds: float = LAUNCH_SECONDS, **options) -> subprocess.CompletedProcess:
    """`command` with its output captured, in a process group of its own that is killed whole at
    `seconds`: a launcher's workers must not outlive a hung test (they would hold its ports, lock
    files and cores for the tests after it). A timed-out run returns -9 and what it printed so far."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **options
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n[test harness: killed after {seconds:.0f} s with every process it started]"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def logged(run_dir: Path, name: str = "train/loss") -> list[float]:
    return [json.loads(line)[name] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def held_out(run_dir: Path) -> dict[str, float]:
    """The numeric held-out metrics measured before and after training."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        f"{when}/{name}": value
        for when in ("before", "after")
        for name, value in metrics[when].items()
        if isinstance(value, (int, float))
    }
