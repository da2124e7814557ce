"""What each benchmark suite runs: the model, the data sizes and the shared hyperparameters.

Both frameworks get exactly these settings; anything not named here is each tool's default,
except gradient checkpointing, which each suite sets for both (TRL turns it on by default, trading
speed for memory; rlhfkit leaves it off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

FRAMEWORKS = ("rlhfkit", "trl")
WORKLOADS = (
    "sft",
    "reward",
    "dpo",
    "grpo",
    "generation",
    "generation_int8",
    "generation_bf16",
    "generation_float32",
    "grpo_int8",
    "grpo_bf16",
    "grpo_bf16_mixed",
    "ppo",
    "ppo_head",
    "trpo",
)
# Workloads TRL has no trainer for: rlhfkit alone, compared with its own GRPO at the same rollout size.
# rlhfkit alone; generation_int8 / _bf16 / _float32 (the CPU rollout copies) read against the generation workload's peer
RLHFKIT_ONLY = (
    "generation_int8",
    "generation_bf16",
    "generation_float32",
    "grpo_int8",
    "grpo_bf16",
    "ppo",
    "ppo_head",
    "trpo",
)
# GRPO with its rollouts sampled by a CPU copy: read against TRL's GRPO step
COPY_RL = (
    ("grpo_int8", "grpo, int8 copy"),
    ("grpo_bf16", "grpo, bf16 copy"),
    # and the update's products in bf16 too (train.mixed_precision), read against TRL's GRPO
    # with bf16=True (its autocast) where the run measured it
    ("grpo_bf16_mixed", "grpo, bf16 copy + bf16 update"),
)


@dataclass(frozen=True)
class Suite:
    name: str
    model: str
    # SFT: chat examples of mixed length (so padding matters), micro-batch size, longest example.
    sft_examples: int
    sft_batch_size: int
    max_length: int
    # Reward model and DPO: preference pairs, pairs per micro-batch.
    pairs: int
    pair_batch_size: int
    # Online RL: prompts per step, group size, completion length, steps.
    rl_prompts: int
    rl_group: int
    rl_new_tokens: int
    rl_steps: int
    # Generation: new tokens per prompt; (batch size, prompts) measured.
    generation_new_tokens: int
    generation_batches: tuple[tuple[int, int], ...]
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = (
        0.0  # PEFT's default; 0.05 costs both tools ~20% of a CPU step in dropout RNG (see profile-sft.txt)
    )
    learning_rate: float = 2e-4
    rl_learning_rate: float = 1e-5
    temperature: float = 0.7
    grpo_beta: float = 0.04
    seed: int = 0
    shared_data: bool = True  # use ../shared/data when present (else the built-in data)
    # Where and how both tools run: device, weight dtype, recomputation, a 4-bit NF4 base (QLoRA).
    device: str = "cpu"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# One CUDA GPU, bf16 weights, a 1.7B model (SmolLM2-1.7B's shape; offline, build one with random
# weights: benchmarks/random_model.py) on the same kinds of data as the CPU suite, more of it.
GPU = Suite(
    name="gpu",
    model="HuggingFaceTB/SmolLM2-1.7B-Instruct",
    device="cuda",
    dtype="bfloat16",
    sft_examples=64,
    sft_batch_size=16,
    max_length=512,
    pairs=32,
    pair_batch_size=8,
    rl_prompts=8,
    rl_group=8,
    rl_new_tokens=128,
    rl_steps=3,
    generation_new_tokens=128,
    generation_batches=((1, 4), (16, 16), (64, 64), (256, 256)),
)

SUITES = {
    # The embedded SmolLM2-135M-Instruct on real data from ../shared/data (falls back to the built-in data).
    "cpu": Suite(
        name="cpu",
        model="smollm2-135m-instruct",
        sft_examples=32,
        sft_batch_size=8,
        max_length=512,
        pairs=16,
        pair_batch_size=4,
        rl_prompts=4,
        rl_group=4,
        rl_new_tokens=64,
        rl_steps=2,
        generation_new_tokens=64,
        generation_batches=((1, 4), (8, 8), (16, 16), (32, 32)),
    ),
    "gpu": GPU,
    # The same with gradient checkpointing on for both tools (memory traded for recomputation).
    "gpu-gc": replace(GPU, name="gpu-gc", gradient_checkpointing=True),
    # QLoRA: the base held in 4-bit NF4 (bitsandbytes), adapters trained in bf16, checkpointing on.
    "gpu-qlora": replace(GPU, name="gpu-qlora", gradient_checkpointing=True, load_in_4bit=True),
    # A few steps on a tiny model: proves the benchmark still runs (the test suite's smoke test).
    "smoke": Suite(
        name="smoke",
        model="smollm2-135m-instruct",
        sft_examples=8,
        sft_batch_size=4,
        max_length=512,
        pairs=4,
        pair_batch_size=2,
        rl_prompts=2,
        rl_group=2,
        rl_new_tokens=8,
        rl_steps=1,
        generation_new_tokens=8,
        generation_batches=((1, 2), (2, 2)),
        shared_data=False,
    ),
}
