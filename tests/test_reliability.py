"""Crash safety and long runs: SIGKILL at random points, then resume; repeated save/resume cycles."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from rlhfkit.config.loading import load_config
from rlhfkit.engine import Engine
from rlhfkit.stages import pretrain

STEPS = 40


def pretrain_settings(model: Path, data: Path, output_dir: Path) -> list[str]:
    # A checkpoint after every step: kills land mid-step and mid-checkpoint-write alike.
    return [
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.max_length=32",
        f"train.output_dir={output_dir}",
        f"train.max_steps={STEPS}",
        "train.save_every=1",
        "train.save_limit=2",
        "train.batch_size=1",
        "train.trackers=[]",
        "train.epochs=1",
    ]


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if '"train/loss"' in line]


def latest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists()]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tiny_model, tmp_path, text_rows):
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    straight = tmp_path / "straight"
    pretrain.run(load_config("pretrain", None, pretrain_settings(tiny_model, data, straight)))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "rlhfkit.cli", "pretrain"]
    for setting in pretrain_settings(tiny_model, data, killed):
        command += ["--set", setting]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    chance = random.Random(7)
    kills = 0
    for target in sorted(chance.sample(range(3, STEPS - 3), 4)):
        resume = ["--resume"] if latest_checkpoint_step(killed) > 0 else []
        process = subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while latest_checkpoint_step(killed) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(chance.uniform(0.0, 0.05))  # somewhere in the next step or its checkpoint write
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 3
    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]

    assert train_losses(killed) == pytest.approx(train_losses(straight), rel=1e-5)
    assert len(train_losses(killed)) == STEPS
    leftovers = [p.name for p in (killed / "checkpoints").iterdir()]
    assert sorted(leftovers) == [f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]  # save_limit kept, no temporaries


class Interrupt(Exception):
    pass


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc (Linux) to count open files")
def test_repeated_save_and_resume_cycles_leak_no_files_memory_or_disk(tiny_model, tmp_path, text_rows, monkeypatch):
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    run_dir = tmp_path / "soak"
    config = load_config("pretrain", None, pretrain_settings(tiny_model, data, run_dir))
    original_save = Engine.save_checkpoint

    def save_then_stop_every_third(self):
        path = original_save(self)
        if self.progress.step % 3 == 0 and self.progress.step < STEPS:
            raise Interrupt(path.name)
        return path

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_stop_every_third)
    samples = []
    resume = False
    while True:
        try:
            pretrain.run(config, resume=resume)
            break
        except Interrupt:
            resume = True
        checkpoints = list((run_dir / "checkpoints").iterdir())
        assert len(checkpoints) <= config.train.save_limit and not any(p.name.startswith(".") for p in checkpoints)
        samples.append((open_files(), resident_mb()))
    assert len(samples) == STEPS // 3  # that many interrupted runs, each resumed
    first_files, first_memory = samples[1]
    last_files, last_memory = samples[-1]
    assert last_files <= first_files + 2, samples
    assert last_memory - first_memory < 150, samples  # MB over 11 more load/train/save cycles
    assert train_losses(run_dir)[-1] > 0 and len(train_losses(run_dir)) == STEPS


def test_a_removal_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning an old checkpoint is interrupted while its files are being deleted: the checkpoint
    is gone from sight at once (never a step-N without state.json, which no later prune would
    recognise), and the hidden remains are cleaned when the run is reopened."""
    import shutil

    from rlhfkit import files

    checkpoints = tmp_path / "checkpoints"
    stale = checkpoints / "step-000011"
    stale.mkdir(parents=True)
    for name in ("state.json", "trainable.safetensors", "optimizer.pt"):
        (stale / name).write_text("x")
    real_rmtree = shutil.rmtree

    def killed_after_one_file(path, ignore_errors=False):
        if Path(path).exists():
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt  # the process dies here
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(files.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        files.remove_dir_atomically(stale)
    monkeypatch.setattr(files.shutil, "rmtree", real_rmtree)
    assert not stale.exists()
    assert [p.name for p in checkpoints.iterdir()] == [".step-000011.tmp-removed"]
    files.clean_stale_temporaries(checkpoints)
    assert list(checkpoints.iterdir()) == []


def test_a_replacement_killed_between_its_renames_keeps_the_old_directory(tmp_path, monkeypatch):
    """Rewriting final/ moves the old one aside, then renames the new one in. A process killed
    between the two renames leaves neither under the name; reopening the run puts the old one back
    (the new one was never complete), and a later rewrite replaces it as usual."""
    from rlhfkit import files

    final = tmp_path / "final"
    files.write_dir_atomically(final, lambda d: (d / "weights").write_text("old"))
    real_rename = Path.rename

    def killed_before_the_new_one_lands(self, target):
        if self.name.startswith(".final.tmp-") and "replaced" not in self.name:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_one_lands)
    with pytest.raises(KeyboardInterrupt):
        files.write_dir_atomically(final, lambda d: (d / "weights").write_text("new"))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not final.exists() and [p.name for p in tmp_path.iterdir()] == [f".final.tmp-replaced-{os.getpid()}"]
    files.clean_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (final / "weights").read_text() == "old"
    files.write_dir_atomically(final, lambda d: (d / "weights").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (final / "weights").read_text() == "new"


def six_steps(tiny_model, data, run_dir):
    settings = pretrain_settings(tiny_model, data, run_dir)
    settings = [s for s in settings if not s.startswith(("train.max_steps", "train.save_limit"))]
    return load_config("pretrain", None, [*settings, "train.max_steps=6", "train.save_limit=3"])


def interrupted_after_step_4(tiny_model, data, run_dir, monkeypatch):
    """A 6-step pretraining run stopped right after its step-4 checkpoint (steps 2, 3, 4 kept)."""
    config = six_steps(tiny_model, data, run_dir)
    original_save = Engine.save_checkpoint

    def stop_after_4(self):
        path = original_save(self)
        if self.progress.step == 4:
            raise Interrupt(path.name)
        return path

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "save_checkpoint", stop_after_4)
        with pytest.raises(Interrupt):
            pretrain.run(config)
    return config


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:100]), "Safe"),
        (lambda c: (c / "state.json").write_text('{"progress": {"step": 4'), "JSONDecodeError"),
        (lambda c: (c / "state.json").write_text("{}"), "lacks progress, rng, total_steps"),
        (lambda c: (c / "optimizer.pt").write_bytes(b"PK\x03\x04"), "optimizer"),
    ],
)
def test_resume_passes_over_a_damaged_latest_checkpoint(
    tiny_model, tmp_path, text_rows, monkeypatch, capsys, damage, reason
):
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    pretrain.run(six_steps(tiny_model, data, tmp_path / "straight"))
    config = interrupted_after_step_4(tiny_model, data, tmp_path / "run", monkeypatch)
    damage(tmp_path / "run" / "checkpoints" / "step-000004")
    capsys.readouterr()
    pretrain.run(config, resume=True)
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step-000004 is damaged" in out and "resuming from" in out and "step-000003" in out
    assert reason in out or reason == "optimizer"
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(tmp_path / "straight"), rel=1e-5)


def test_a_full_disk_while_checkpointing_is_named_and_keeps_the_previous_checkpoint(
    tiny_model, tmp_path, text_rows, monkeypatch, capsys
):
    from safetensors import SafetensorError

    from rlhfkit.cli import main
    from rlhfkit.engine import checkpointing

    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    real_save = checkpointing.save_file
    calls = []

    def disk_full_at_the_third(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", disk_full_at_the_third)
    arguments = [
        part for setting in pretrain_settings(tiny_model, data, tmp_path / "run") for part in ("--set", setting)
    ]
    assert main(["pretrain", *arguments]) == 2
    error = capsys.readouterr().err
    assert "error: could not write checkpoint" in error and "No space left on device" in error
    assert "the previous checkpoint" in error and "step-000002 is intact" in error and "Traceback" not in error


def test_a_read_only_filesystem_under_the_metrics_log_is_named(tiny_model, tmp_path, text_rows, monkeypatch, capsys):
    import errno

    from rlhfkit.cli import main
    from rlhfkit.engine import tracking

    data = write_jsonl(tmp_path / "text.jsonl", text_rows)

    def read_only(root, step, metrics):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(root / tracking.METRICS_LOG))

    monkeypatch.setattr(tracking, "append_metrics", read_only)
    arguments = [
        part for setting in pretrain_settings(tiny_model, data, tmp_path / "run") for part in ("--set", setting)
    ]
    assert main(["pretrain", *arguments]) == 2
    error = capsys.readouterr().err
    assert f"error: {tmp_path / 'run' / 'metrics.jsonl'}: Read-only file system" in error and "Traceback" not in error


def test_json_files_hold_null_where_a_statistic_is_not_a_number(tmp_path):
    from rlhfkit.engine import tracking
    from rlhfkit.files import json_text, write_json_atomically

    value = {"mean": float("nan"), "spread": [1.0, float("inf"), -float("inf")], "text": "ok", "count": 3}
    assert json_text(value) == '{"mean": null, "spread": [1.0, null, null], "text": "ok", "count": 3}'
    write_json_atomically(tmp_path / "metrics.json", value)
    tracking.append_metrics(tmp_path, 1, {"train/reward_mean": float("nan"), "train/loss": 0.5})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)["mean"] is None
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "train/reward_mean": None, "train/loss": 0.5}


def test_the_ci_deprecation_hook_raises_for_rlhfkit_calls_only(monkeypatch):
    """The hook behind RLHFKIT_DEPRECATIONS_AS_ERRORS=1 (.ci/run): a deprecated API called from a
    file under src/rlhfkit raises; called from anywhere else it only warns."""
    import warnings

    import conftest

    monkeypatch.setattr(warnings, "warn", warnings.warn)  # the hook replaces it; restored after the test
    conftest.raise_deprecations_from_our_calls()

    def deprecated_api():
        warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)

    ours = {"deprecated_api": deprecated_api}
    exec(compile("def call():\n    deprecated_api()\n", str(conftest.SOURCE / "caller.py"), "exec"), ours)
    with pytest.raises(FutureWarning, match=r"old_api is deprecated \(called from rlhfkit at .*caller.py:2\)"):
        ours["call"]()
    with pytest.warns(FutureWarning, match="old_api is deprecated"):
        deprecated_api()  # called from a test file: a warning, not an error
