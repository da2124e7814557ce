"""`rlhfkit reward`: train a reward model on preference pairs with the Bradley–Terry loss.

A one-output sequence-classification head on the backbone (LoRA on the backbone, the head fully
trained; or full fine-tuning). Chosen and rejected answers of a batch go through the model in one
forward pass, packed into rows without padding when the model is a decoder (the reward is read at
each sequence's last token; each pair's prompt stored once when the model runs rlhfkit's
attention). Pair accuracy, mean margin and reward statistics are measured on held-out pairs
before and after training.
"""

from __future__ import annotations

import torch

from rlhfkit.attention import shares_prompts
from rlhfkit.config import RewardConfig
from rlhfkit.data.batching import RewardBatch, reward_batches
from rlhfkit.data.examples import load_examples, preference_examples, training_data_summary
from rlhfkit.data.formatting import tokenize_pairs
from rlhfkit.engine import Engine, LossOutput, RunDir, steps_for
from rlhfkit.engine.held_out import held_out_sums
from rlhfkit.losses.reward import bradley_terry_loss
from rlhfkit.models import backbone_and_score_head, packs_by_position_ids, resolve_with_tokenizer
from rlhfkit.passes import packed_reward_forward, reward_model_forward
from rlhfkit.rewards import special_token_wrapper
from rlhfkit.stages.before_after import measure

STAGE = "reward"


def pair_rewards(model: torch.nn.Module, batch: RewardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) chosen and (B,) rejected rewards from one forward over both halves."""
    if batch.position_ids is not None:
        rewards = packed_reward_forward(model, batch.input_ids, batch.position_ids, batch.last_positions, batch.layout)
    else:
        rewards = reward_model_forward(model, batch.input_ids, batch.attention_mask)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]  # (2B,): chosen, then rejected


def reward_loss(center_coef: float, use_margins: bool):
    def loss_fn(model: torch.nn.Module, batch: RewardBatch) -> LossOutput:
        chosen, rejected = pair_rewards(model, batch)
        losses = bradley_terry_loss(chosen, rejected, batch.margins if use_margins else None, center_coef)
        difference = (chosen - rejected).detach()
        return LossOutput(
            losses.sum(),
            {
                "accuracy": (difference > 0).sum().item(),
                "margin": difference.sum().item(),
                "chosen_mean": chosen.detach().sum().item(),
                "rejected_mean": rejected.detach().sum().item(),
            },
        )

    return loss_fn


def evaluate_pairs(engine: Engine, batches: list[RewardBatch]) -> dict[str, float]:
    """Pair accuracy (ties count half), mean margin r_c − r_r, and reward mean/std over held-out
    pairs, from sums over the batches (split over the launch's processes)."""

    def sums_of(batch: RewardBatch) -> dict[str, float]:
        chosen, rejected = pair_rewards(engine.model, batch)
        return {
            "wins": ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item(),
            "chosen": chosen.sum().item(),
            "rejected": rejected.sum().item(),
            "squares": (chosen.double().square().sum() + rejected.double().square().sum()).item(),
            "pairs": chosen.numel(),
        }

    sums = held_out_sums(engine, batches, sums_of)
    pairs, total = sums["pairs"], sums["chosen"] + sums["rejected"]
    rewards = 2 * pairs
    variance = (
        (sums["squares"] - total * total / rewards) / (rewards - 1) if rewards > 1 else 0.0
    )  # unbiased, as torch.std
    return {
        "accuracy": sums["wins"] / pairs,
        "margin": (sums["chosen"] - sums["rejected"]) / pairs,
        "reward_mean": total / rewards,
        "reward_std": max(variance, 0.0) ** 0.5,
        "chosen_mean": sums["chosen"] / pairs,
        "rejected_mean": sums["rejected"] / pairs,
        "pairs": int(pairs),
    }


def run(config: RewardConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data = config.train, config.data

    # Data: every row is read and checked before any weights load.
    train_examples, eval_examples, report = load_examples(data, train.seed, preference_examples)
    source, tokenizer = resolve_with_tokenizer(config.model)
    wrap = special_token_wrapper(tokenizer)
    length = data.max_length - len(wrap([]))  # leave room for [CLS]/[SEP]
    train_pairs, counts = tokenize_pairs(tokenizer, train_examples, data.template, length, data.overlong)
    eval_pairs, _ = tokenize_pairs(tokenizer, eval_examples, data.template, length, data.overlong)
    print(f"data: {training_data_summary(report, counts, len(train_pairs), len(eval_pairs), 'pairs')}")

    # Model and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora, reward_model=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    packed = packs_by_position_ids(model)  # decoders: sequences packed into rows, no padding
    share = packed and shares_prompts(backbone_and_score_head(model)[0])  # and a pair's prompt stored once
    batches = lambda pairs, seed: reward_batches(
        pairs, train.batch_size, tokenizer.pad_token_id, seed, wrap, packed, share
    )  # noqa: E731
    batches_for_epoch = lambda epoch: batches(train_pairs, train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    eval_batches = batches(eval_pairs, None)[: config.eval.max_batches]
    evaluate = (lambda: evaluate_pairs(engine, eval_batches)) if eval_batches else None
    engine.resume(resume)

    # Train, measuring held-out pair accuracy before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", evaluate)
    engine.fit(batches_for_epoch, reward_loss(config.loss.center_coef, config.loss.use_margins), evaluate)
    measure(engine, metrics, "after", evaluate)

    # Save.
    engine.save_final(
        tokenizer, config.model.name_or_path, {"stage": STAGE, "lora": config.lora.enabled, "reward_model": True}
    )
    engine.complete(metrics, report.summary())
    return metrics
