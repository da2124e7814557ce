"""`rlhfkit reward`: train a reward model on preference pairs (Bradley–Terry) or on answers
labelled 👍 / 👎 (pointwise, logistic).

A one-output sequence-classification head on the backbone (LoRA on the backbone, the head fully
trained; or full fine-tuning). Pairwise, chosen and rejected answers of a batch go through the
model in one forward pass, packed into rows without padding when the model is a decoder (the
reward is read at each sequence's last token; each pair's prompt stored once when the model runs
rlhfkit's attention); pair accuracy, mean margin and reward statistics are measured on held-out
pairs before and after training. Pointwise, each labelled answer is one sequence, the reward is
the log-odds that it is liked, and held out the stage measures how often its sign matches the
label and the AUC (how often a liked answer outscores a disliked one).
"""

from __future__ import annotations

import torch

from rlhfkit.attention import shares_prompts
from rlhfkit.config import RewardConfig
from rlhfkit.data.batching import LabelledAnswersBatch, RewardBatch, labelled_answer_batches, reward_batches
from rlhfkit.data.examples import (
    FeedbackExample,
    feedback_examples,
    label_counts,
    load_examples_by_source,
    preference_examples,
    training_data_summary,
)
from rlhfkit.data.formatting import tokenize_feedback, tokenize_pairs
from rlhfkit.data.loading import source_labels
from rlhfkit.engine import Engine, LossOutput, RunDir, steps_for
from rlhfkit.engine.held_out import held_out_rows, held_out_sums
from rlhfkit.errors import ConfigError
from rlhfkit.losses.reward import binary_feedback_loss, bradley_terry_loss
from rlhfkit.metrics import agreement, ranking_auc
from rlhfkit.models import (
    backbone_and_score_head,
    packs_by_position_ids,
    resolve_with_tokenizer,
)
from rlhfkit.passes import packed_reward_forward, reward_model_forward
from rlhfkit.rewards import refuse_beyond_learned_positions, special_token_wrapper
from rlhfkit.stages.before_after import measure

STAGE = "reward"


def sequence_rewards(model: torch.nn.Module, batch: RewardBatch | LabelledAnswersBatch) -> torch.Tensor:
    """(S,) rewards of the batch's sequences, packed into one row or padded."""
    if batch.position_ids is not None:
        return packed_reward_forward(model, batch.input_ids, batch.position_ids, batch.last_positions, batch.layout)
    return reward_model_forward(model, batch.input_ids, batch.attention_mask)


def pair_rewards(model: torch.nn.Module, batch: RewardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) chosen and (B,) rejected rewards from one forward over both halves."""
    rewards = sequence_rewards(model, batch)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]  # (2B,): chosen, then rejected


def label_loss(model: torch.nn.Module, batch: LabelledAnswersBatch) -> LossOutput:
    """The pointwise logistic loss; train metrics per answer: sign agreement with the label, and
    the reward signed by the label (> 0: on the right side)."""
    rewards = sequence_rewards(model, batch)
    signed = torch.where(batch.labels, rewards, -rewards).detach()
    return LossOutput(
        binary_feedback_loss(rewards, batch.labels).sum(),
        {
            "label_accuracy": agreement(signed).sum().item(),
            "label_reward": signed.sum().item(),
        },
    )


def evaluate_answers(engine: Engine, parts: dict[str, list[LabelledAnswersBatch]]) -> dict[str, float]:
    """Held-out label accuracy (the reward's sign; ties count half), AUC, log-loss and the mean
    reward of each class, from every answer's reward (split over the launch's processes); with
    several sources, label accuracy and AUC of each too. `parts`: each source's batches, none empty."""

    def rows_of(batch: LabelledAnswersBatch) -> torch.Tensor:
        return torch.stack([sequence_rewards(engine.model, batch), batch.labels.float()], dim=1)  # (N, 2)

    part_rows = {label: held_out_rows(engine, batches, rows_of, width=2) for label, batches in parts.items()}
    rows = torch.cat(list(part_rows.values()))
    rewards, liked = rows[:, 0], rows[:, 1] > 0.5
    scores = {
        **_label_agreement(rewards, liked),
        "log_loss": binary_feedback_loss(rewards, liked).mean().item(),
        "reward_desirable": rewards[liked].mean().item(),
        "reward_undesirable": rewards[~liked].mean().item(),
        "examples": int(rewards.numel()),
    }
    for label, part in part_rows.items() if len(part_rows) > 1 else ():
        agreement = _label_agreement(part[:, 0], part[:, 1] > 0.5)
        scores |= {f"{name}/{label}": value for name, value in agreement.items()} | {f"examples/{label}": len(part)}
    return scores


def _label_agreement(rewards: torch.Tensor, liked: torch.Tensor) -> dict[str, float]:
    signed = torch.where(liked, rewards, -rewards)
    return {
        "label_accuracy": agreement(signed).double().mean().item(),
        "auc": ranking_auc(rewards.tolist(), liked.tolist()),
    }


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


SUM_NAMES = ("wins", "chosen", "rejected", "squares", "pairs")


def evaluate_pairs(engine: Engine, parts: dict[str, list[RewardBatch]]) -> dict[str, float]:
    """Pair accuracy (ties count half), mean margin r_c − r_r, and reward mean/std over held-out
    pairs, from sums over the batches (split over the launch's processes); with several sources,
    the pair accuracy of each too. `parts`: each source's held-out batches, none empty."""

    def sums_of(batch: RewardBatch) -> dict[str, float]:
        chosen, rejected = pair_rewards(engine.model, batch)
        return {
            "wins": agreement(chosen - rejected).sum().item(),
            "chosen": chosen.sum().item(),
            "rejected": rejected.sum().item(),
            "squares": (chosen.double().square().sum() + rejected.double().square().sum()).item(),
            "pairs": chosen.numel(),
        }

    part_sums = {label: held_out_sums(engine, batches, sums_of) for label, batches in parts.items()}
    sums = {name: sum(part[name] for part in part_sums.values()) for name in SUM_NAMES}
    pairs, total = sums["pairs"], sums["chosen"] + sums["rejected"]
    rewards = 2 * pairs
    variance = (
        (sums["squares"] - total * total / rewards) / (rewards - 1) if rewards > 1 else 0.0
    )  # unbiased, as torch.std
    scores = {
        "accuracy": sums["wins"] / pairs,
        "margin": (sums["chosen"] - sums["rejected"]) / pairs,
        "reward_mean": total / rewards,
        "reward_std": max(variance, 0.0) ** 0.5,
        "chosen_mean": sums["chosen"] / pairs,
        "rejected_mean": sums["rejected"] / pairs,
        "pairs": int(pairs),
    }
    for label, part in part_sums.items() if len(part_sums) > 1 else ():
        scores |= {f"accuracy/{label}": part["wins"] / part["pairs"], f"pairs/{label}": int(part["pairs"])}
    return scores


def reward_examples(objective: str):
    """The row parser for loss.objective: preference pairs, labelled answers, or (auto) whichever
    the rows hold — labelled answers when they have a `label` column."""

    def parse(rows: list, on_invalid: str) -> tuple[list, object]:
        binary = objective == "binary" or (objective == "auto" and "label" in rows[0].values)
        return (feedback_examples if binary else preference_examples)(rows, on_invalid)

    return parse


def run(config: RewardConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data = config.train, config.data

    # Data: every row is read and checked before any weights load; the rows decide the objective.
    parse = reward_examples(config.loss.objective)
    train_examples, eval_parts, report = load_examples_by_source(data, train.seed, parse)
    pointwise = isinstance(train_examples[0], FeedbackExample)
    if pointwise:
        label_counts(train_examples, f"{data.path} (training split)")
        if config.loss.center_coef:
            raise ConfigError("loss.center_coef centres pairwise rewards; a binary (👍/👎) reward model has no pairs")
    source, tokenizer = resolve_with_tokenizer(config.model)
    wrap = special_token_wrapper(tokenizer)
    length = data.max_length - len(wrap([]))  # leave room for [CLS]/[SEP]
    tokenize = tokenize_feedback if pointwise else tokenize_pairs
    train_set, counts = tokenize(tokenizer, train_examples, data.template, length, data.overlong)
    labels = source_labels(list(eval_parts))
    eval_sets = {
        labels[source]: tokenize(tokenizer, part, data.template, length, data.overlong)[0]
        for source, part in eval_parts.items()
    }
    eval_set = [example for part in eval_sets.values() for example in part]
    unit = "labelled answers" if pointwise else "pairs"
    print(f"data: {training_data_summary(report, counts, len(train_set), len(eval_set), unit)}")

    # Model and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora, reward_model=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    backbone = backbone_and_score_head(model)[0]
    refuse_beyond_learned_positions(backbone, data.max_length, "data.max_length", config.model.name_or_path)
    packed = packs_by_position_ids(model)  # decoders: sequences packed into rows, no padding
    share = packed and shares_prompts(backbone)  # and a pair's prompt stored once
    if pointwise:
        batches = lambda examples, seed: labelled_answer_batches(  # noqa: E731
            examples, train.batch_size, tokenizer.pad_token_id, seed, wrap, packed
        )
        loss_fn, evaluate_held_out = label_loss, evaluate_answers
    else:
        batches = lambda pairs, seed: reward_batches(  # noqa: E731
            pairs, train.batch_size, tokenizer.pad_token_id, seed, wrap, packed, share
        )
        loss_fn, evaluate_held_out = reward_loss(config.loss.center_coef, config.loss.use_margins), evaluate_pairs
    batches_for_epoch = lambda epoch: batches(train_set, train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    eval_batches = {label: batches(part, None)[: config.eval.max_batches] for label, part in eval_sets.items() if part}
    evaluate = (lambda: evaluate_held_out(engine, eval_batches)) if eval_batches else None
    engine.resume(resume)

    # Train, measuring held-out accuracy before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", evaluate)
    engine.fit(batches_for_epoch, loss_fn, evaluate)
    measure(engine, metrics, "after", evaluate)

    # Save.
    engine.save_final(
        tokenizer,
        config.model.name_or_path,
        {
            "stage": STAGE,
            "lora": config.lora.enabled,
            "reward_model": True,
            "objective": "binary" if pointwise else "pairwise",
        },
    )
    engine.complete(metrics, report.summary())
    return metrics
