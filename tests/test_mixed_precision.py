"""train.mixed_precision bf16: training passes multiply in bfloat16 over float32 weights, the LM
head and losses stay float32, and it is refused where it cannot serve."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from rlhfkit.config import TrainSettings
from rlhfkit.config.loading import load_config
from rlhfkit.engine import Engine, RunDir, distributed
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.losses import lm
from rlhfkit.stages import sft


def test_head_logits_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(8, 64) * 4, torch.randn(500, 64)
    plain = hidden @ weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_product = (hidden @ weight.T).float()
        logits = lm.head_logits(hidden, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    # the product autocast would have made instead: logits of ~30 off by a tenth
    assert (autocast_product - plain).abs().max() > 0.03


def sft_run(tiny_model, data, output_dir, *extra):
    config = load_config(
        "sft",
        None,
        [
            f"model.name_or_path={tiny_model}",
            f"data.path={data}",
            "data.eval_fraction=0.2",
            f"train.output_dir={output_dir}",
            "train.lr=5e-3",
            "train.trackers=[]",
            "train.max_steps=4",
            "train.batch_size=4",
            "lora.dropout=0.0",
            "generation.num_prompts=0",
            *extra,
        ],
    )
    return sft.run(config)


def logged_losses(run_dir):
    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_mixed_precision_trains_float32_weights_on_the_float32_curve(tiny_model, tmp_path, sft_rows, monkeypatch):
    # autocast runs on any CPU (slowly without bf16 instructions): the check is for speed, not correctness
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: True)
    head_calls = []
    plain_head_logits = lm.head_logits

    def recording_head_logits(hidden, weight):
        head_calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return plain_head_logits(hidden, weight)

    monkeypatch.setattr(lm, "head_logits", recording_head_logits)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft_run(tiny_model, data, tmp_path / "float32")
    assert head_calls and not any(autocast for _, autocast in head_calls)
    head_calls.clear()
    metrics = sft_run(tiny_model, data, tmp_path / "bf16", "train.mixed_precision=bf16")
    # the training passes ran under autocast; held-out evaluation stays float32
    assert any(grad and autocast for grad, autocast in head_calls)
    assert not any(autocast for grad, autocast in head_calls if not grad)
    float32, bf16 = logged_losses(tmp_path / "float32"), logged_losses(tmp_path / "bf16")
    assert bf16 == pytest.approx(float32, rel=2e-2) and bf16 != float32  # bf16 products, the same descent
    assert bf16[-1] < bf16[0] and metrics["after"]["perplexity"] < metrics["before"]["perplexity"]
    adapter = load_file(str(tmp_path / "bf16" / "final" / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in adapter.values()} == {torch.float32}


def test_mixed_precision_no_reads_as_yaml_writes_it(tmp_path):
    for written in ("no", "'no'", "false"):
        config = load_config("sft", None, [f"train.mixed_precision={written}", f"data.path={tmp_path}"])
        assert config.train.mixed_precision == "no", written
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config("sft", None, ["train.mixed_precision=fp16", f"data.path={tmp_path}"])


def test_mixed_precision_auto_is_bf16_only_where_it_serves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: True)
    engine = Engine(TrainSettings(mixed_precision="auto", trackers=[]), "cpu", RunDir(tmp_path), "sft")
    with engine.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert "mixed precision: auto -> bf16" in capsys.readouterr().out
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: False)
    engine = Engine(TrainSettings(mixed_precision="auto", trackers=[]), "cpu", RunDir(tmp_path), "sft")
    with engine.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert "mixed precision: auto -> no (this CPU has no bf16 matrix instructions)" in capsys.readouterr().out
    # under DeepSpeed (or FSDP) the launch decides, where bf16 itself would be refused
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    Engine(TrainSettings(mixed_precision="auto", trackers=[]), "cpu", RunDir(tmp_path), "sft")
    assert "auto -> no (FSDP and DeepSpeed take their precision from the launch)" in capsys.readouterr().out


def test_bf16_mixed_precision_is_refused_on_a_cpu_without_bf16_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: False)
    with pytest.raises(UserError, match="train.mixed_precision bf16 needs a CPU with bfloat16 matrix instructions"):
        Engine(TrainSettings(mixed_precision="bf16", trackers=[]), "cpu", RunDir(tmp_path), "sft")


def test_bf16_mixed_precision_is_refused_under_deepspeed_with_the_launch_flag_to_use(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="accelerate launch --mixed_precision bf16"):
        Engine(TrainSettings(mixed_precision="bf16", trackers=[]), "cpu", RunDir(tmp_path), "sft")
