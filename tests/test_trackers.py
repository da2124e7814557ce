"""Metrics reach TensorBoard by default, and W&B / MLflow (offline, no network) when installed and asked for."""

import pytest

from conftest import write_jsonl
from rlhfkit.config.loading import load_config
from rlhfkit.stages import sft


def run_sft(model, rows, tmp_path, trackers):
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run" / "sft"
    config = load_config(
        "sft",
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={data}",
            "data.eval_fraction=0.25",
            f"train.output_dir={out}",
            f"train.trackers={trackers}",
            "train.max_steps=2",
            "train.batch_size=4",
            "generation.num_prompts=0",
            "train.tracker_project=tests",
        ],
    )
    sft.run(config)
    return out


def test_tensorboard_events_are_written(tiny_model, sft_rows, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_sft(tiny_model, sft_rows, tmp_path, "[tensorboard]")
    (events,) = (out / "logs" / "tests").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2]


def test_wandb_offline_run_is_written(tiny_model, sft_rows, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional: pip install rlhfkit[wandb]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run_sft(tiny_model, sft_rows, tmp_path, "[wandb]")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_mlflow_file_store_holds_the_metrics(tiny_model, sft_rows, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is optional: pip install rlhfkit[mlflow]")
    # A local file store (no server, no network); full mlflow can use sqlite:///mlflow.db instead.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_sft(tiny_model, sft_rows, tmp_path, "[mlflow]")
    client = mlflow.tracking.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "tests"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run/sft" and run.data.params["train.max_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
