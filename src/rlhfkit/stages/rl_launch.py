"""What the online RL stages refuse at launch, before any weights load: process counts their
prompts and minibatches cannot be split between, and sharded launches they cannot run under."""

from __future__ import annotations

from rlhfkit.config import RLConfig
from rlhfkit.engine import fsdp_launch
from rlhfkit.engine.deepspeed_zero import deepspeed_launch
from rlhfkit.errors import UserError


def check_process_count(config: RLConfig, stage: str, processes: int, minibatch_size: int | None) -> None:
    """Several processes: prompts and minibatches must split evenly between them."""
    if processes == 1:
        return
    if config.rollout.prompts_per_step % processes:
        raise UserError(
            f"rollout.prompts_per_step ({config.rollout.prompts_per_step}) must be a multiple of the {processes} processes"
        )
    if minibatch_size and minibatch_size % processes:
        raise UserError(f"{stage}.minibatch_size ({minibatch_size}) must be a multiple of the {processes} processes")


def sharded_launch() -> bool:
    """Whether this process holds a shard of the policy (FSDP, or DeepSpeed ZeRO)."""
    return fsdp_launch() or deepspeed_launch()


def check_sharded_launch(config: RLConfig, stage: str) -> None:
    """Under FSDP or DeepSpeed: GRPO and PPO with LoRA on the HF rollout engine.

    Rollouts, reference and old log-probs and critic values are passes outside the sharded
    training forward: they run with the root's weights gathered (Engine.full_weights), each block
    gathering its own; the updates run inside the sharded forward like every other stage's.
    """
    if fsdp_launch():
        how = "sharded (FSDP)"
    elif deepspeed_launch():
        how = "under DeepSpeed"
    else:
        return
    data_parallel = "launch it data-parallel (configs/accelerate/ddp.yaml) instead"
    if stage == "trpo":
        raise UserError(
            f"trpo does not run {how}: its natural-gradient step differentiates and sets the weights outside "
            f"the training forward (forward-mode and backward passes over whole, not sharded, weights); {data_parallel}"
        )
    if not config.lora.enabled:
        raise UserError(
            f"{stage} {how} needs LoRA (lora.enabled: true): the reference is the policy with its "
            f"adapters off, where full fine-tuning would keep a whole frozen copy on every process; {data_parallel}"
        )
    if config.rollout.engine != "hf":
        raise UserError(
            f"rollout.engine: {config.rollout.engine} does not run with a policy {how} yet; "
            f"use rollout.engine: hf or {data_parallel}"
        )
