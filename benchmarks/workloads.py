"""Workloads of one framework, each run in a process of its own so its peak RSS is its own.

    python -m benchmarks.workloads WORKLOAD [WORKLOAD ...] FRAMEWORK --suite cpu --workdir DIR [--model M]

Each workload ends by printing ``RESULT {json}``: the seconds of every optimizer step, the work done
(tokens, pairs, steps), the peak RSS of the process and workload details. rlhfkit runs through its
stage entry points (what `rlhfkit sft` etc. run); TRL through its trainers, with a callback timing
each optimizer step the same way (from the start of the step to the end of the optimizer update).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.suites import FRAMEWORKS, SUITES, WORKLOADS, Suite  # noqa: E402

RESULT_PREFIX = "RESULT "


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_gpu_mb() -> float | None:
    """The most GPU memory PyTorch's allocator held for tensors in this process (None without CUDA)."""
    import torch

    return (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )


def files(workdir: Path) -> dict[str, str]:
    return json.loads((workdir / "data.json").read_text())["files"]


# ---- rlhfkit: the stage entry points ----------------------------------------------------


def _rlhfkit_common(suite: Suite, model: str, output_dir: Path, **train: Any) -> dict:
    return {
        "model": {
            "name_or_path": model,
            "dtype": suite.dtype,
            "device": suite.device,
            "load_in_4bit": suite.load_in_4bit,
        },
        "lora": {
            "r": suite.lora_r,
            "alpha": suite.lora_alpha,
            "dropout": suite.lora_dropout,
            "target_modules": "all-linear",
        },
        "train": {
            "output_dir": str(output_dir),
            "trackers": [],
            "seed": suite.seed,
            "log_every": 1,
            "gradient_checkpointing": suite.gradient_checkpointing,
            **train,
        },
    }


def _logged_steps(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if '"train/' in line]


def sft_token_count(config) -> tuple[int, dict[str, int]]:
    """Tokens rlhfkit trains on (prompt + response) and the per-example lengths behind the FLOP count."""
    from rlhfkit.data.examples import chat_examples, load_examples
    from rlhfkit.data.formatting import tokenize_examples
    from rlhfkit.models import resolve_with_tokenizer

    examples, _, _ = load_examples(config.data, config.train.seed, chat_examples)
    _, tokenizer = resolve_with_tokenizer(config.model)
    tokenized, _ = tokenize_examples(
        tokenizer, examples, config.data.template, config.data.max_length, config.data.overlong
    )
    lengths = [len(example.input_ids) for example in tokenized]
    targets = [sum(example.loss_mask[1:]) for example in tokenized]
    return sum(lengths), {"squared_lengths": sum(n * n for n in lengths), "target_tokens": sum(targets)}


def model_shape(model: str) -> dict[str, int]:
    """Layer count, width and linear-layer parameter counts (body and LM head) of a causal LM."""
    from transformers import AutoConfig

    from rlhfkit.models import resolve

    source = resolve(model)
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    return {
        "layers": layers,
        "hidden": d,
        "kv_dim": kv,
        "body_params": layers * per_layer,
        "head_params": config.vocab_size * d,
    }


def sft_useful_flops(shape: dict[str, int], tokens: int, counts: dict[str, int]) -> float:
    """FLOPs LoRA training must do on these examples, whatever the tool:

      4·N_body per token (forward 2N, input-gradient backward 2N; frozen weights get no gradient)
    + 4·N_head per target token (logits are only needed where there is a loss)
    + 6·layers·d·L² per example of length L (causal attention: QKᵀ and AV, forward + backward).
    """
    return (
        4 * shape["body_params"] * tokens
        + 4 * shape["head_params"] * counts["target_tokens"]
        + 6 * shape["layers"] * shape["hidden"] * counts["squared_lengths"]
    )


def rlhfkit_sft(suite: Suite, model: str, workdir: Path) -> dict:
    from rlhfkit.config import SFTConfig
    from rlhfkit.stages import sft

    output_dir = workdir / "rlhfkit-sft"
    config = SFTConfig.model_validate(
        {
            **_rlhfkit_common(
                suite, model, output_dir, batch_size=suite.sft_batch_size, epochs=1, lr=suite.learning_rate
            ),
            "data": {"path": files(workdir)["sft_rlhfkit"], "eval_fraction": 0.0, "max_length": suite.max_length},
            "eval": {"before": False},
            "generation": {"num_prompts": 0},
        }
    )
    sft.run(config)
    tokens, counts = sft_token_count(config)
    steps = _logged_steps(output_dir)
    return {
        "step_seconds": [s["train/step_s"] for s in steps],
        "units": tokens,
        "unit": "tokens",
        "useful_flops": sft_useful_flops(model_shape(model), tokens, counts),
        **counts,
    }


def rlhfkit_pairs(stage_name: str, suite: Suite, model: str, workdir: Path) -> dict:
    from rlhfkit.config import DPOConfig, RewardConfig
    from rlhfkit.stages import dpo, reward

    output_dir = workdir / f"rlhfkit-{stage_name}"
    settings = {
        **_rlhfkit_common(suite, model, output_dir, batch_size=suite.pair_batch_size, epochs=1, lr=suite.learning_rate),
        "data": {"path": files(workdir)["pairs_rlhfkit"], "eval_fraction": 0.0, "max_length": suite.max_length},
        "eval": {"before": False},
    }
    if stage_name == "reward":
        reward.run(RewardConfig.model_validate(settings))
    else:
        dpo.run(DPOConfig.model_validate({**settings, "generation": {"num_prompts": 0}}))
    steps = _logged_steps(output_dir)
    return {"step_seconds": [s["train/step_s"] for s in steps], "units": suite.pairs, "unit": "pairs"}


def rlhfkit_online(
    stage_name: str,
    suite: Suite,
    model: str,
    workdir: Path,
    rollout_engine: str = "hf",
    mixed_precision: str = "no",
    **section: Any,
) -> dict:
    """An RL stage on the arithmetic prompts; `section`: settings of its own section (e.g. ppo's
    critic); rollout_engine: what samples the rollouts (hf: the policy; int8, bf16: its CPU copy);
    mixed_precision: train.mixed_precision of the update."""
    from rlhfkit import registry

    named = [
        *map(str, section.values()),
        *([rollout_engine] if rollout_engine != "hf" else []),
        *([f"mixed-{mixed_precision}"] if mixed_precision != "no" else []),
    ]
    output_dir = workdir / f"rlhfkit-{stage_name}{'-' + '-'.join(named) if named else ''}"
    batch = suite.rl_prompts * suite.rl_group
    settings = {
        **_rlhfkit_common(
            suite,
            model,
            output_dir,
            batch_size=batch,
            max_steps=suite.rl_steps,
            lr=suite.rl_learning_rate,
            scheduler="constant",
            warmup_ratio=0.0,
            mixed_precision=mixed_precision,
        ),
        "data": {"path": files(workdir)["prompts_rlhfkit"], "eval_fraction": 0.0},
        "rollout": {
            "prompts_per_step": suite.rl_prompts,
            "samples_per_prompt": suite.rl_group,
            "max_new_tokens": suite.rl_new_tokens,
            "temperature": suite.temperature,
            "batch_size": batch,
            "engine": rollout_engine,
        },
        "reward": {"function": "rlhfkit.reward_functions:numeric_answer"},
        "eval": {"before": False, "num_prompts": 0},
    }
    if stage_name == "grpo":
        settings["grpo"] = {"beta": suite.grpo_beta}
    if section:
        settings[stage_name] = {**settings.get(stage_name, {}), **section}
    stage = registry.stage(stage_name)
    build_cpu_kernels(rollout_engine)
    stage.runner(stage.config_class.model_validate(settings))
    steps = _logged_steps(output_dir)
    generation = [s["train/time_generation_s"] for s in steps]
    update = [s["train/time_update_s"] for s in steps]
    return {
        "step_seconds": [g + u for g, u in zip(generation, update)],
        "generation_seconds": generation,
        "units": len(steps),
        "unit": "steps",
        "completion_length": sum(s["train/length"] for s in steps) / len(steps),
    }


def build_cpu_kernels(engine: str) -> None:
    """Compile (or load) the int8 copy's kernel before the clock starts: the build happens once
    per install (~12 s), not in a step."""
    if engine == "int8":
        from rlhfkit.cpu_kernels import int8_linear_kernel

        int8_linear_kernel()


def generation_prompts(workdir: Path, count: int) -> list[str]:
    rows = [json.loads(line) for line in Path(files(workdir)["prompts_rlhfkit"]).read_text().splitlines()]
    return [row["prompt"] for row in rows[:count]]


def measure_generation(suite: Suite, workdir: Path, generate: Callable[[list[str]], tuple[list[int], int]]) -> dict:
    """New tokens/s per batch size; `generate` samples for a batch of prompts and returns the
    new-token count of each row and the prompts' padded width (the KV cache every row starts with)."""
    generate(generation_prompts(workdir, 1))  # warm-up: first-call allocations
    results = {}
    for batch_size, count in suite.generation_batches:
        prompts = generation_prompts(workdir, count)
        started, tokens, widths = time.perf_counter(), 0, []
        for start in range(0, count, batch_size):
            new_tokens, prompt_width = generate(prompts[start : start + batch_size])
            tokens, widths = tokens + sum(new_tokens), [*widths, prompt_width]
        results[str(batch_size)] = {
            "seconds": time.perf_counter() - started,
            "new_tokens": tokens,
            "prompt_width": sum(widths) / len(widths),
        }
    return {"batches": results, "unit": "new tokens", "new_tokens_per_row": suite.generation_new_tokens}


def _load_model(suite: Suite, model_name: str, reward_model: bool = False):
    """The model and tokenizer as rlhfkit loads them (the suite's dtype; a 4-bit base for QLoRA), on the suite's device."""
    import torch

    from rlhfkit.config import ModelSettings
    from rlhfkit.models import load_causal_lm, load_reward_model, resolve_with_tokenizer

    settings = ModelSettings(
        name_or_path=model_name, dtype=suite.dtype, device=suite.device, load_in_4bit=suite.load_in_4bit
    )
    source, tokenizer = resolve_with_tokenizer(settings)
    model = (load_reward_model if reward_model else load_causal_lm)(source, settings, getattr(torch, suite.dtype))
    return (model if suite.load_in_4bit else model.to(suite.device)), tokenizer  # a 4-bit model is placed as it loads


def rlhfkit_generation(suite: Suite, model_name: str, workdir: Path, engine: str = "hf") -> dict:
    """Sampling as the RL stages do it: the model itself (engine hf), or its rollout copy, built
    once from the model, its log-probs kept (engine int8: smoothed on 16 of the prompts; bf16; float32)."""
    import torch

    from rlhfkit.config import SamplingSettings
    from rlhfkit.data.formatting import render_prompt
    from rlhfkit.rollout_copy import build_copy
    from rlhfkit.sampling import global_seeds, sample_rollout

    model, tokenizer = _load_model(suite, model_name)
    model.eval()
    torch.manual_seed(suite.seed)
    chat = lambda prompts: [render_prompt(tokenizer, ({"role": "user", "content": p},), "auto") for p in prompts]  # noqa: E731
    calibration = chat(generation_prompts(workdir, 16))
    build_cpu_kernels(engine)
    copy = None if engine == "hf" else build_copy(engine, model, tokenizer, calibration, suite.max_length)

    def generate(prompts: list[str]) -> tuple[list[int], int]:
        settings = SamplingSettings(
            max_new_tokens=suite.generation_new_tokens, temperature=suite.temperature, batch_size=len(prompts)
        )
        texts = chat(prompts)
        if copy is None:
            rollout = sample_rollout(model, tokenizer, texts, settings, 1, suite.max_length)
        else:
            rollout = copy.sample(model, 0, texts, settings, 1, suite.max_length, global_seeds(len(texts)))
        return [int(n) for n in rollout.lengths], rollout.prompt_ids.shape[1]

    return measure_generation(suite, workdir, generate)


# ---- TRL: its trainers, timed by a callback ---------------------------------------------


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds of every optimizer step: data for the step, forward/backward, optimizer update."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    return StepTimer()


def _trl_args(config_class, suite: Suite, workdir: Path, name: str, **overrides: Any):
    overrides.setdefault("bf16", suite.dtype == "bfloat16")
    return config_class(
        output_dir=str(workdir / f"trl-{name}"),
        use_cpu=suite.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=suite.seed,
        gradient_checkpointing=suite.gradient_checkpointing,
        dataloader_drop_last=False,
        **overrides,
    )


def _trl_lora(suite: Suite, task_type: str):
    from peft import LoraConfig

    return LoraConfig(
        r=suite.lora_r,
        lora_alpha=suite.lora_alpha,
        lora_dropout=suite.lora_dropout,
        target_modules="all-linear",
        task_type=task_type,
        **({"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}),
    )


def _dataset(path: str):
    from datasets import load_dataset

    return load_dataset("json", data_files=path, split="train")


def trl_sft(suite: Suite, model_name: str, workdir: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _trl_model(suite, model_name)
    timer = _step_timer()
    tokens = {"seen": 0}

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            tokens["seen"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = _trl_args(
        SFTConfig,
        suite,
        workdir,
        "sft",
        per_device_train_batch_size=suite.sft_batch_size,
        num_train_epochs=1,
        learning_rate=suite.learning_rate,
        max_length=suite.max_length,
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(files(workdir)["sft_trl"]),
        processing_class=tokenizer,
        peft_config=_trl_lora(suite, "CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    return {"step_seconds": timer.seconds, "units": tokens["seen"], "unit": "tokens"}


def _trl_model(suite: Suite, model_name: str, reward_model: bool = False):
    """The same weights rlhfkit starts from, with transformers' own SDPA attention (not rlhfkit's)."""
    model, tokenizer = _load_model(suite, model_name, reward_model)
    model.set_attn_implementation("sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.train(), tokenizer


def trl_pairs(trainer_name: str, suite: Suite, model_name: str, workdir: Path) -> dict:
    """TRL's RewardTrainer ("reward") or DPOTrainer ("dpo") for one epoch over the pairs."""
    import trl

    config_class, trainer_class, task = {
        "reward": (trl.RewardConfig, trl.RewardTrainer, "SEQ_CLS"),
        "dpo": (trl.DPOConfig, trl.DPOTrainer, "CAUSAL_LM"),
    }[trainer_name]
    model, tokenizer = _trl_model(suite, model_name, reward_model=trainer_name == "reward")
    timer = _step_timer()
    args = _trl_args(
        config_class,
        suite,
        workdir,
        trainer_name,
        per_device_train_batch_size=suite.pair_batch_size,
        num_train_epochs=1,
        learning_rate=suite.learning_rate,
        max_length=suite.max_length,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=_dataset(files(workdir)["pairs_trl"]),
        processing_class=tokenizer,
        peft_config=_trl_lora(suite, task),
        callbacks=[timer],
    )
    trainer.train()
    return {"step_seconds": timer.seconds, "units": suite.pairs, "unit": "pairs"}


def trl_grpo(suite: Suite, model_name: str, workdir: Path, mixed_precision: bool = False) -> dict:
    """TRL's GRPO step; mixed_precision: bf16=True over the suite's (float32) weights, i.e.
    accelerate's bf16 autocast, TRL's counterpart of train.mixed_precision bf16."""
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.reward_functions import numeric_answer

    model, tokenizer = _trl_model(suite, model_name)
    timer = _step_timer()
    generation_seconds: list[float] = []

    def arithmetic_reward(prompts, completions, answer, **_):
        return numeric_answer(
            prompts, [c[0]["content"] if isinstance(c, list) else c for c in completions], answer=answer
        )

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            started = time.perf_counter()
            result = super()._generate(prompts)
            generation_seconds.append(time.perf_counter() - started)
            return result

    batch = suite.rl_prompts * suite.rl_group
    args = _trl_args(
        GRPOConfig,
        suite,
        workdir,
        "grpo",
        per_device_train_batch_size=batch,
        num_generations=suite.rl_group,
        max_completion_length=suite.rl_new_tokens,
        temperature=suite.temperature,
        top_p=1.0,
        top_k=0,
        beta=suite.grpo_beta,
        max_steps=suite.rl_steps,
        learning_rate=suite.rl_learning_rate,
        lr_scheduler_type="constant",
        **({"bf16": True} if mixed_precision else {}),
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[arithmetic_reward],
        args=args,
        train_dataset=_dataset(files(workdir)["prompts_trl"]),
        processing_class=tokenizer,
        peft_config=_trl_lora(suite, "CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    lengths = [
        entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry
    ]
    return {
        "step_seconds": timer.seconds,
        "generation_seconds": generation_seconds,
        "units": len(timer.seconds),
        "unit": "steps",
        "completion_length": sum(lengths) / max(len(lengths), 1),
    }


def trl_generation(suite: Suite, model_name: str, workdir: Path) -> dict:
    """The peer: transformers' `generate` with the sampling config TRL's GRPO trainer builds."""
    import torch
    from transformers import GenerationConfig

    model, tokenizer = _trl_model(suite, model_name)
    model.eval()
    tokenizer.padding_side = "left"
    config = GenerationConfig(
        max_new_tokens=suite.generation_new_tokens,
        do_sample=True,
        temperature=suite.temperature,
        top_p=1.0,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(suite.seed)

    @torch.no_grad()
    def generate(prompts: list[str]) -> tuple[list[int], int]:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        new = model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1] :]
        is_eos = new == tokenizer.eos_token_id
        # Tokens up to and including the first EOS.
        lengths = [int(row.nonzero()[0]) + 1 if row.any() else new.shape[1] for row in is_eos]
        return lengths, inputs["input_ids"].shape[1]

    return measure_generation(suite, workdir, generate)


RUNNERS: dict[tuple[str, str], Callable[[Suite, str, Path], dict]] = {
    ("sft", "rlhfkit"): rlhfkit_sft,
    ("reward", "rlhfkit"): lambda *a: rlhfkit_pairs("reward", *a),
    ("dpo", "rlhfkit"): lambda *a: rlhfkit_pairs("dpo", *a),
    ("grpo", "rlhfkit"): lambda *a: rlhfkit_online("grpo", *a),
    ("grpo_int8", "rlhfkit"): lambda *a: rlhfkit_online("grpo", *a, rollout_engine="int8"),
    ("grpo_bf16", "rlhfkit"): lambda *a: rlhfkit_online("grpo", *a, rollout_engine="bf16"),
    ("grpo_bf16_mixed", "rlhfkit"): lambda *a: rlhfkit_online(
        "grpo", *a, rollout_engine="bf16", mixed_precision="bf16"
    ),
    ("grpo_bf16_mixed", "trl"): lambda *a: trl_grpo(*a, mixed_precision=True),
    ("ppo", "rlhfkit"): lambda *a: rlhfkit_online("ppo", *a),
    # the critic the CPU configs use: a linear value head on the reference pass's hidden states
    ("ppo_head", "rlhfkit"): lambda *a: rlhfkit_online("ppo", *a, critic="head"),
    ("trpo", "rlhfkit"): lambda *a: rlhfkit_online("trpo", *a),
    ("generation", "rlhfkit"): rlhfkit_generation,
    ("generation_int8", "rlhfkit"): lambda *a: rlhfkit_generation(*a, engine="int8"),
    ("generation_bf16", "rlhfkit"): lambda *a: rlhfkit_generation(*a, engine="bf16"),
    ("generation_float32", "rlhfkit"): lambda *a: rlhfkit_generation(*a, engine="float32"),
    ("sft", "trl"): trl_sft,
    ("reward", "trl"): lambda *a: trl_pairs("reward", *a),
    ("dpo", "trl"): lambda *a: trl_pairs("dpo", *a),
    ("grpo", "trl"): trl_grpo,
    ("generation", "trl"): trl_generation,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="+", choices=WORKLOADS, metavar="workload")
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--model", default=None, help="override the suite's model")
    parser.add_argument("--workdir", type=Path, required=True, help="holds data.json from benchmarks.data.prepare")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    missing = [workload for workload in args.workloads if (workload, args.framework) not in RUNNERS]
    if missing:
        raise SystemExit(f"{args.framework} has no {', '.join(missing)} workload")
    # Several workloads in one process share its imports; the peak RSS each reports is then the
    # largest so far, not its own.
    for workload in args.workloads:
        started = time.perf_counter()
        result = RUNNERS[workload, args.framework](suite, args.model or suite.model, args.workdir)
        result.update(
            {
                "workload": workload,
                "framework": args.framework,
                "peak_rss_mb": peak_rss_mb(),
                "peak_gpu_mb": peak_gpu_mb(),
                "wall_seconds": time.perf_counter() - started,
            }
        )
        sys.stdout.flush()
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
