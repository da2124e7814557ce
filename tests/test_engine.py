import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from rlhfkit.config.loading import load_config
from rlhfkit.engine import Engine, RunDir, TrainingError, lr_multiplier
from rlhfkit.errors import UserError
from rlhfkit.stages import pretrain, sft


def test_lr_schedule_by_hand():
    # 10 steps, 2 warmup: warmup multipliers (s+1)/(w+1) = 1/3, 2/3; then cosine over 8 steps.
    values = [lr_multiplier(s, 10, 2, "cosine") for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[6] == pytest.approx(0.5)  # halfway through decay: (1 + cos(pi/2)) / 2
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 2, "constant") == 1.0


def sft_config(tiny_model, data_path, output_dir, *overrides):
    return load_config(
        "sft",
        None,
        [
            f"model.name_or_path={tiny_model}",
            f"data.path={data_path}",
            "data.eval_fraction=0.2",
            f"train.output_dir={output_dir}",
            "train.lr=5e-3",
            "train.trackers=[]",
            "lora.dropout=0.1",
            "generation.num_prompts=2",
            "generation.max_new_tokens=4",
            *overrides,
        ],
    )


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_is_invariant_to_micro_batch_split(tiny_model, tmp_path, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    common = ["train.max_steps=3", "lora.dropout=0.0", "eval.before=false", "generation.num_prompts=0"]
    sft.run(sft_config(tiny_model, data, tmp_path / "one", "train.batch_size=4", "train.grad_accum=1", *common))
    sft.run(sft_config(tiny_model, data, tmp_path / "four", "train.batch_size=1", "train.grad_accum=4", *common))
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "four"), rel=1e-4)
    one, four = final_adapter(tmp_path / "one"), final_adapter(tmp_path / "four")
    for name in one:
        torch.testing.assert_close(one[name], four[name], rtol=1e-4, atol=1e-5)


class Interrupt(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tiny_model, tmp_path, sft_rows, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    settings = ["train.epochs=2", "train.batch_size=4", "train.save_every=3"]
    sft.run(sft_config(tiny_model, data, tmp_path / "straight", *settings))

    original_save = Engine.save_checkpoint

    def save_then_crash(self):
        path = original_save(self)
        raise Interrupt(f"simulated crash after {path.name}")

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupt):
        sft.run(sft_config(tiny_model, data, tmp_path / "resumed", *settings))
    monkeypatch.setattr(Engine, "save_checkpoint", original_save)
    assert not (tmp_path / "resumed" / "final").exists()
    with pytest.raises(UserError, match="already holds a run"):
        sft.run(sft_config(tiny_model, data, tmp_path / "resumed", *settings))
    sft.run(sft_config(tiny_model, data, tmp_path / "resumed", *settings), resume=True)

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 10  # 19 train rows -> 5 micro-batches of <= 4 per epoch, x 2 epochs
    assert resumed == pytest.approx(straight, rel=1e-5)
    for name, weight in final_adapter(tmp_path / "straight").items():
        torch.testing.assert_close(final_adapter(tmp_path / "resumed")[name], weight, rtol=1e-5, atol=1e-6)


def small_pretrain_config(model, tmp_path, text_rows, *extra: str):
    """4 pretraining steps on the tiny model with a checkpoint every 2, into tmp_path/run."""
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    return load_config(
        "pretrain",
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={data}",
            "data.max_length=32",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            "train.save_every=2",
            "train.trackers=[]",
            *extra,
        ],
    )


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_model, tmp_path, text_rows, monkeypatch):
    config = small_pretrain_config(tiny_model, tmp_path, text_rows)
    original_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint's optimizer file: simulate a full disk
            raise OSError(28, "No space left on device")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(TrainingError) as error:
        pretrain.run(config)
    assert "No space left on device" in str(error.value) and "step-000002 is intact" in str(error.value)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # no half-written step-000004
    monkeypatch.setattr(torch, "save", original_save)

    # A crash mid-write leaves only a hidden temporary, which is ignored and cleaned on resume.
    (checkpoints / ".step-000004.tmp-crash").mkdir()
    metrics = pretrain.run(config, resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    assert metrics["after"]["perplexity"] > 0


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_good_checkpoint(
    tiny_model, tmp_path, text_rows, monkeypatch
):
    import rlhfkit.passes as forward

    config = small_pretrain_config(tiny_model, tmp_path, text_rows, "train.batch_size=1")
    real_loss, training_calls = forward.causal_lm_nll_sum, {"n": 0}

    def loss_that_overflows_at_step_3(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():
            training_calls["n"] += 1
            if training_calls["n"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(forward, "causal_lm_nll_sum", loss_that_overflows_at_step_3)
    with pytest.raises(TrainingError, match=r"step 3: loss is nan; stopping \(last good checkpoint: .*step-000002\)"):
        pretrain.run(config)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]


def test_an_infinite_gradient_stops_the_run_or_is_skipped_and_counted(tiny_model, tmp_path, text_rows, monkeypatch):
    from accelerate import Accelerator

    real_clip, calls = Accelerator.clip_grad_norm_, {"n": 0}

    def gradient_blows_up_at_step_3(self, parameters, max_norm, *args, **kwargs):
        norm = real_clip(self, parameters, max_norm, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                for parameter in parameters:
                    parameter.grad.fill_(float("inf"))
            return torch.tensor(float("inf"))
        return norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", gradient_blows_up_at_step_3)
    with pytest.raises(
        TrainingError, match=r"step 3: gradient norm is inf; stopping \(last good checkpoint: .*step-000002\)"
    ):
        pretrain.run(small_pretrain_config(tiny_model, tmp_path, text_rows, "train.batch_size=1"))

    calls["n"] = 0
    (tmp_path / "skip").mkdir()
    skipping = small_pretrain_config(
        tiny_model, tmp_path / "skip", text_rows, "train.batch_size=1", "train.on_nonfinite=skip"
    )
    pretrain.run(skipping)
    log = [
        json.loads(line)
        for line in (tmp_path / "skip" / "run" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert [entry.get("train/skipped_nonfinite", 0) for entry in log] == [0, 0, 1, 0]
    adapter = final_adapter(tmp_path / "skip" / "run")
    assert all(
        torch.isfinite(weight).all() for weight in adapter.values()
    )  # the inf gradient never reached the weights


def test_checkpoint_dir_that_is_not_one(tiny_model, tmp_path, text_rows):
    data = write_jsonl(tmp_path / "text.jsonl", text_rows)
    config = load_config(
        "pretrain",
        None,
        [
            f"model.name_or_path={tiny_model}",
            f"data.path={data}",
            "data.max_length=32",
            f"train.output_dir={tmp_path / 'run'}",
            "train.trackers=[]",
        ],
    )
    run = RunDir.open(str(tmp_path / "run"), "pretrain", config, resume=False)
    engine = Engine(config.train, "cpu", run, "pretrain")
    from rlhfkit.models import resolve

    engine.prepare(engine.build_model(resolve(str(tiny_model)), config.model, config.lora), total_steps=2)
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    with pytest.raises(UserError, match="not an rlhfkit checkpoint"):
        engine.load_checkpoint(bogus)
    with pytest.raises(UserError, match="no complete checkpoint"):
        engine.load_checkpoint()
    with pytest.raises(UserError, match="no run to resume"):
        RunDir.open(str(tmp_path / "elsewhere"), "pretrain", config, resume=True)
    with pytest.raises(UserError, match="is a pretrain run, not a sft run"):
        RunDir.open(str(tmp_path / "run"), "sft", config, resume=True)


def test_run_json_records_the_command_environment_and_times(tmp_path, monkeypatch):
    """run.json says how a run's figures were made: the command, versions and machine when it
    starts (kept when it resumes, each resumption added with the first sitting's last write), and
    when it finished."""
    import json
    import os
    from datetime import datetime, timezone

    from rlhfkit.config.loading import load_config

    monkeypatch.setattr("sys.argv", ["/usr/bin/rlhfkit", "sft", "my config.yaml"])
    config = load_config("sft", None, [f"train.output_dir={tmp_path / 'run'}"])
    run = RunDir.open(str(tmp_path / "run"), "sft", config, resume=False)
    started = json.loads((run.root / "run.json").read_text())
    assert started["command"] == "rlhfkit sft 'my config.yaml'" and started["status"] == "running"
    assert {"python", "torch", "transformers", "cpu", "cores"} <= set(started["environment"])
    (run.root / "final").mkdir()  # a run with work in it resumes
    last_log = run.root / "logs" / "events"
    last_log.parent.mkdir()
    last_log.write_text("step 7")  # the first sitting's last write, an hour before the resume
    written = datetime(2026, 12, 7, 9, 0, tzinfo=timezone.utc)
    os.utime(last_log, (written.timestamp(), written.timestamp()))
    resumed = RunDir.open(str(tmp_path / "run"), "sft", config, resume=True)
    resumed.write_marker("sft", "complete")
    record = json.loads((run.root / "run.json").read_text())
    assert record["started"] == started["started"] and record["command"] == started["command"]
    assert len(record["resumed"]) == 1 and record["finished"] >= record["resumed"][0] >= started["started"]
    # opening the run rewrites run.json and config.yaml; the log is what the first sitting wrote last
    assert record["stopped"] == [written.isoformat()]


def test_the_widest_matrix_instructions_of_a_cpu_name_the_kernels_its_figures_came_from():
    from rlhfkit.engine.run_dir import widest_matrix_instructions

    assert widest_matrix_instructions({"fma", "avx", "avx2"}) == "AVX2"
    assert widest_matrix_instructions({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert widest_matrix_instructions({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX-BF16"
    assert widest_matrix_instructions({"neon", "asimd"}) is None  # an Arm CPU: no x86 flags, nothing claimed


def test_a_run_that_died_before_its_first_checkpoint_can_start_again(tiny_model, tmp_path, sft_rows, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    config = sft_config(tiny_model, data, tmp_path / "run", "train.max_steps=2", "generation.num_prompts=0")

    def crash(self, *args, **kwargs):
        raise Interrupt("died during the first step")

    monkeypatch.setattr(Engine, "fit", crash)
    with pytest.raises(Interrupt):
        sft.run(config)
    monkeypatch.undo()
    assert sft.run(config)["after"]["perplexity"] > 0  # nothing to lose, so no --resume needed
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("launch_type", ["MEGATRON_LM"])
def test_unsupported_sharding_launches_are_refused_by_name(monkeypatch, launch_type):
    import accelerate
    from accelerate.utils import DistributedType

    from rlhfkit.engine import process_state

    class ShardingLaunch:
        def __init__(self, cpu):
            self.distributed_type = DistributedType(launch_type)

    monkeypatch.setattr(accelerate, "PartialState", ShardingLaunch)
    with pytest.raises(UserError, match=f"this launch uses {launch_type}.*configs/accelerate/fsdp.yaml"):
        process_state("auto")


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0", "zero_stage 0 is not supported"),
        ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json", r"deepspeed_config_file \(ds.json\) is not read by rlhfkit"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme", "offload_param_device: nvme is not supported"),
        (
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "4",
            r"gradient_accumulation_steps 4: set train.grad_accum.*\(now 2\)",
        ),
        ("ACCELERATE_GRADIENT_CLIPPING", "0.3", r"gradient_clipping 0.3 differs from train.max_grad_norm \(1.0\)"),
        ("ACCELERATE_MIXED_PRECISION", "fp16", "fp16 mixed precision"),
    ],
)
def test_deepspeed_launch_settings_rlhfkit_does_not_honour_are_refused_by_name(monkeypatch, variable, value, message):
    from rlhfkit.engine.deepspeed_zero import zero_stage

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero_stage(grad_accum=2, max_grad_norm=1.0) == 3
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")  # the same as train.max_grad_norm: fine
    assert zero_stage(grad_accum=2, max_grad_norm=1.0) == 3
    monkeypatch.setenv(variable, value)
    with pytest.raises(UserError, match=message):
        zero_stage(grad_accum=2, max_grad_norm=1.0)


def test_skipping_nonfinite_updates_is_refused_under_deepspeed_before_a_model_loads(monkeypatch, tmp_path):
    from rlhfkit.config import TrainSettings
    from rlhfkit.engine import Engine, RunDir

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="train.on_nonfinite: skip does not run under DeepSpeed"):
        Engine(TrainSettings(on_nonfinite="skip", trackers=[]), "cpu", RunDir(tmp_path), "sft")


def test_an_fsdp1_launch_is_refused_with_the_fix(monkeypatch):
    from rlhfkit.engine import fsdp_launch, process_state

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert fsdp_launch()
    with pytest.raises(UserError, match="set fsdp_version: 2"):
        process_state("auto")


def test_gradient_checkpointing_keeps_the_loss_curve(tiny_model, tmp_path, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    common = [
        "train.max_steps=3",
        "lora.dropout=0.0",
        "eval.before=false",
        "generation.num_prompts=0",
        "train.batch_size=4",
    ]
    sft.run(sft_config(tiny_model, data, tmp_path / "plain", *common))
    sft.run(sft_config(tiny_model, data, tmp_path / "checkpointed", *common, "train.gradient_checkpointing=true"))
    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


def test_load_in_4bit_is_refused_where_it_cannot_work(tiny_model, tmp_path, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    with pytest.raises(UserError, match="only adapters can train: set lora.enabled: true"):
        sft_config(tiny_model, data, tmp_path / "a", "model.load_in_4bit=true", "lora.enabled=false")
    with pytest.raises(UserError, match="model.load_in_4bit needs a CUDA GPU"):
        sft_config(tiny_model, data, tmp_path / "b", "model.load_in_4bit=true", "model.device=cpu")
    if not torch.cuda.is_available():  # device auto on a machine without a GPU: refused at load, naming the field
        with pytest.raises(UserError, match="model.load_in_4bit needs a CUDA GPU, and none is visible"):
            sft.run(sft_config(tiny_model, data, tmp_path / "c", "model.load_in_4bit=true"))
