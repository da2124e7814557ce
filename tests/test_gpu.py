"""GPU paths: bf16 weights, QLoRA (4-bit base) for SFT/reward/DPO, data parallelism over GPUs,
FSDP2 sharding and DeepSpeed ZeRO-2/3 over GPUs, and the vLLM rollout engine.

Each test runs wherever its hardware is present and is skipped with the reason otherwise (the CPU
CI machine skips them all). Gradient checkpointing is checked on CPU in test_engine.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from launching import accelerate_launch, failure_report, launch, logged, settings

from conftest import write_jsonl
from rlhfkit.config import ModelSettings
from rlhfkit.config.loading import load_config
from rlhfkit.models import load_causal_lm, resolve
from rlhfkit.stages import dpo, reward, sft

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install 'rlhfkit[qlora]')"
)
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (pip install 'rlhfkit[deepspeed]')"
)
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install 'rlhfkit[vllm]')"
)

STAGES = {"sft": sft, "reward": reward, "dpo": dpo}


@pytest.fixture()
def stage_data(tmp_path, sft_rows):
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No idea, go away."} for r in sft_rows]
    preferences = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    return {"sft": write_jsonl(tmp_path / "sft.jsonl", sft_rows), "reward": preferences, "dpo": preferences}


def gpu_config(stage, model, data, output_dir, *overrides):
    return load_config(
        stage,
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={data}",
            "data.eval_fraction=0.25",
            "model.device=cuda",
            f"train.output_dir={output_dir}",
            "train.trackers=[]",
            "train.batch_size=4",
            "train.max_steps=6",
            "train.lr=5e-3",
            "lora.dropout=0.0",
            *(["generation.num_prompts=0"] if stage != "reward" else []),
            *overrides,
        ],
    )


def improved(stage: str, metrics: dict) -> bool:
    """Held-out: SFT perplexity falls, the reward model's margin grows, the DPO loss falls."""
    before, after = metrics["before"], metrics["after"]
    if stage == "sft":
        return after["perplexity"] < before["perplexity"]
    if stage == "reward":
        return after["margin"] > before["margin"]
    return after["loss"] < before["loss"]


@needs_cuda
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_stages_train_in_bf16_on_a_gpu(tiny_model, stage_data, tmp_path, stage):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16")
    metrics = STAGES[stage].run(gpu_config(stage, tiny_model, stage_data[stage], tmp_path / stage))
    assert improved(stage, metrics)
    assert all(loss == loss for loss in logged(tmp_path / stage))  # no NaN loss in bf16
    assert all(peak > 0 for peak in logged(tmp_path / stage, "train/gpu_peak_gb"))  # GPU memory is logged


@needs_cuda
def test_packed_attention_on_a_gpu_matches_a_block_diagonal_mask_forward_and_backward():
    """bf16 on the GPU, where the per-sequence calls run on flash/memory-efficient attention."""
    import torch.nn.functional as F

    from rlhfkit.attention import packed_sdpa_attention, sequence_boundaries

    torch.manual_seed(0)
    lengths = [37, 1, 130, 64]
    positions = torch.cat([torch.arange(n) for n in lengths])[None, :].cuda()
    total = sum(lengths)
    inputs = [
        torch.randn(1, heads, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for heads in (8, 4, 4)
    ]
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, True
    output, _ = packed_sdpa_attention(module, *inputs, None, **sequence_boundaries(positions))
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    mask = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
    query, key, value = (tensor.detach().float().requires_grad_() for tensor in inputs)
    expected = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(output.float(), expected.transpose(1, 2), rtol=2e-2, atol=2e-2)
    weights = torch.randn_like(expected.transpose(1, 2))
    (output.float() * weights).sum().backward()
    (expected.transpose(1, 2) * weights).sum().backward()
    for packed, reference in zip(inputs, (query, key, value)):
        torch.testing.assert_close(packed.grad.float(), reference.grad, rtol=5e-2, atol=5e-2)


@needs_cuda
@needs_bitsandbytes
def test_load_in_4bit_quantizes_the_base_linear_layers(tiny_model):
    import bitsandbytes

    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(device="cuda", load_in_4bit=True), torch.bfloat16)
    assert model.is_loaded_in_4bit
    assert isinstance(model.model.layers[0].mlp.up_proj, bitsandbytes.nn.Linear4bit)


@needs_cuda
@needs_bitsandbytes
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_qlora_trains_adapters_on_a_4bit_base(tiny_model, stage_data, tmp_path, stage):
    out = tmp_path / stage
    metrics = STAGES[stage].run(gpu_config(stage, tiny_model, stage_data[stage], out, "model.load_in_4bit=true"))
    assert improved(stage, metrics)
    assert (out / "final" / "adapter_config.json").exists()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@needs_two_gpus
def test_sft_on_two_gpus_follows_the_one_gpu_loss_curve(tiny_model, stage_data, tmp_path):
    common = (
        f"model.name_or_path={tiny_model}",
        f"data.path={stage_data['sft']}",
        "data.eval_fraction=0.2",
        "model.device=cuda",
        "model.dtype=float32",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=5e-3",
        "lora.dropout=0.0",
        "generation.num_prompts=0",
    )
    launch(1, "sft", *common, f"train.output_dir={tmp_path / 'one'}")
    launch(2, "sft", *common, f"train.output_dir={tmp_path / 'two'}", launch_config="ddp.yaml")
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=1e-3)


@needs_cuda
@needs_vllm
def test_vllm_samples_the_policy_as_updated_not_as_started(tiny_model):
    """The engine starts from the policy's fresh-adapter weights; after the adapters change and the
    version moves, its near-greedy samples are the updated policy's greedy continuations."""
    from rlhfkit.config import LoraSettings, RolloutSettings
    from rlhfkit.models import attach_lora, load_tokenizer
    from rlhfkit.sampling import encode_prompts
    from rlhfkit.vllm_rollout import VLLMSampler

    source = resolve("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    policy = (
        attach_lora(
            load_causal_lm(source, ModelSettings(device="cuda"), torch.bfloat16), LoraSettings(r=8, dropout=0.0)
        )
        .cuda()
        .eval()
    )
    settings = RolloutSettings(engine="vllm", temperature=1e-4, max_new_tokens=12, vllm_gpu_memory=0.2)
    sampler = VLLMSampler(policy, tokenizer, settings, max_model_len=256, processes=1, seed=0, version=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_((torch.randn(parameter.shape, generator=generator) * 0.02).to(parameter))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ["What is 2 + 3?", "Name a colour.", "Why is the sky blue?", "Say hello."]
    ]
    rollout = sampler.sample(policy, 1, prompts, settings, 1, 128, seeds=[0, 1, 2, 3])
    ids, mask = encode_prompts(tokenizer, prompts, 128)
    greedy = policy.generate(
        input_ids=ids.cuda(),
        attention_mask=mask.cuda(),
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=tokenizer.pad_token_id,
    )[:, ids.shape[1] :].cpu()
    agree = [rollout.response_ids[i, :8].tolist() == greedy[i, :8].tolist() for i in range(4)]
    assert sum(agree) >= 3, (rollout.completions, tokenizer.batch_decode(greedy))  # bf16 near-ties may flip one
    sampler.close()


@needs_cuda
@needs_vllm
def test_grpo_with_vllm_rollouts_trains_and_reports(tmp_path):
    from rlhfkit.stages import grpo

    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(2, 9) for b in range(3, 7)]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    out = tmp_path / "grpo"
    metrics = grpo.run(
        load_config(
            "grpo",
            None,
            [
                "model.name_or_path=smollm2-135m-instruct",
                "model.device=cuda",
                f"data.path={data}",
                f"train.output_dir={out}",
                "train.trackers=[]",
                "train.max_steps=3",
                "train.lr=1e-4",
                "rollout.engine=vllm",
                "rollout.vllm_gpu_memory=0.2",
                "rollout.prompts_per_step=4",
                "rollout.samples_per_prompt=4",
                "rollout.max_new_tokens=24",
                "eval.num_prompts=4",
            ],
        )
    )
    log = logged(out, "train/kl")
    assert len(log) == 3 and log[0] == pytest.approx(0.0, abs=1e-2)  # the first rollout is the reference policy's own
    assert abs(metrics["after"]["kl"]) > 0 and (out / "final" / "adapter_config.json").exists()


@needs_two_gpus
@pytest.mark.parametrize(
    "launch_config",
    ["fsdp.yaml", pytest.param("zero2.yaml", marks=needs_deepspeed), pytest.param("zero3.yaml", marks=needs_deepspeed)],
)
def test_full_fine_tuning_sharded_over_two_gpus_follows_the_one_gpu_loss_curve(
    tiny_model, stage_data, tmp_path, launch_config
):
    """configs/accelerate/fsdp.yaml on 2 GPUs (FSDP2 over NCCL), float32 shards with bf16 compute,
    or zero2/zero3.yaml (DeepSpeed, bf16 with float32 master weights), against the one-GPU float32 run."""
    common = (
        f"model.name_or_path={tiny_model}",
        f"data.path={stage_data['sft']}",
        "data.eval_fraction=0.2",
        "model.device=cuda",
        "model.dtype=float32",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "lora.enabled=false",
        "generation.num_prompts=0",
    )
    launch(1, "sft", *common, f"train.output_dir={tmp_path / 'one'}")
    launch(
        2,
        "sft",
        *common,
        f"train.output_dir={tmp_path / 'two'}",
        launch_config=launch_config,
        launcher=("--mixed_precision", "bf16"),
    )
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=2e-2)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()


@needs_cuda
@needs_deepspeed
@pytest.mark.parametrize("launch_config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_on_one_gpu_trains_bf16_with_float32_master_weights(tiny_model, stage_data, tmp_path, launch_config):
    """A one-process DeepSpeed launch on a GPU (NCCL, DeepSpeed's bf16 optimizer path) against the
    plain one-GPU float32 run: near the same curve, float32 weights in final/."""
    common = (
        f"model.name_or_path={tiny_model}",
        f"data.path={stage_data['sft']}",
        "data.eval_fraction=0.2",
        "model.device=cuda",
        "model.dtype=float32",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "lora.enabled=false",
        "generation.num_prompts=2",
    )
    launch(1, "sft", *common, f"train.output_dir={tmp_path / 'plain'}")
    done = accelerate_launch(
        1,
        ["sft", *settings("train.trackers=[]", *common, f"train.output_dir={tmp_path / 'zero'}")],
        launch_config,
        ("--mixed_precision", "bf16"),
    )
    assert done.returncode == 0, failure_report(done.stderr)
    assert logged(tmp_path / "zero") == pytest.approx(logged(tmp_path / "plain"), rel=2e-2)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "zero" / "final" / "model.safetensors")).values()} == {
        torch.float32
    }
