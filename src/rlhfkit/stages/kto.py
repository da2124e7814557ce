"""`rlhfkit kto`: Kahneman–Tversky optimisation of a policy on answers labelled 👍 or 👎.

KTO needs no pairs: each example is one answer and a label (the export of the single-answer
labeling page, or thumbs from a deployed assistant); preference pairs are unpaired into a 👍 and
a 👎 answer. The policy and reference are as in `rlhfkit dpo` (adapters off, or a frozen copy
when fully fine-tuning). Each labelled answer y_i is packed beside a mismatched answer y'_i (one
of another example of its micro-batch) under the same prompt, prompt stored once; the mismatched
answers' policy-to-reference log-ratio gives KTO's reference point z₀ (losses/kto.py).

Held out, the stage measures the loss, the implicit rewards β·log π/π_ref of 👍 and 👎 answers
and their gap, and how often the implicit reward's sign agrees with the label (0.5 before
training, when policy and reference are equal).
"""

from __future__ import annotations

import torch

from rlhfkit.attention import shares_prompts
from rlhfkit.config import KTOConfig
from rlhfkit.data.batching import FeedbackBatch, feedback_batches
from rlhfkit.data.examples import feedback_examples, label_counts, load_examples, training_data_summary
from rlhfkit.data.formatting import tokenize_feedback
from rlhfkit.engine import Engine, LossOutput, RunDir, steps_for
from rlhfkit.engine.held_out import held_out_sums
from rlhfkit.losses.kto import kto_loss, kto_reference_point
from rlhfkit.metrics import agreement
from rlhfkit.models import backbone_and_head, frozen_reference_copy, resolve_with_tokenizer
from rlhfkit.passes import answer_logps
from rlhfkit.stages.before_after import HeldOutAnswers, measure
from rlhfkit.stages.dpo import ReferencePolicy

STAGE = "kto"


def balance_note(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A note when λ_D·n_D / (λ_U·n_U) leaves [1, 4/3], the range the KTO paper advises (§4.2),
    with the desirable weight that would bring it back."""
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable_weight * undesirable / desirable
    return (
        f"note: {desirable} 👍 and {undesirable} 👎 examples give λ_D·n_D / (λ_U·n_U) = {ratio:.2f}; the KTO paper "
        f"advises 1 to 1.33, e.g. kto.desirable_weight between {low:.2f} and {low * 4 / 3:.2f}"
    )


def example_statistics(config: KTOConfig, reference: ReferencePolicy):
    """Per-example KTO loss and diagnostics of a batch, shared by training and evaluation."""
    settings, chunk = config.kto, config.train.loss_chunk_tokens

    def statistics(model: torch.nn.Module, batch: FeedbackBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        count, desirable = batch.num_examples, batch.labels
        logps = answer_logps(model, batch.pairs, chunk)  # (2B,): y_i, then y'_i
        ref_logps = reference.compute(batch.pairs, training_pairs=False)  # (2B,), no gradient
        reference_point = kto_reference_point(logps[count:], ref_logps[count:])  # z₀, ()
        losses = kto_loss(
            logps[:count],
            ref_logps[:count],
            desirable,
            reference_point,
            settings.beta,
            settings.desirable_weight,
            settings.undesirable_weight,
        )
        rewards = settings.beta * (logps[:count] - ref_logps[:count]).detach()  # implicit rewards, (B,)
        signed = torch.where(desirable, rewards, -rewards)  # > 0: moved towards 👍, away from 👎
        return losses, {
            "label_accuracy": agreement(signed),
            "label_reward": signed,
            "kl": reference_point.expand(count),
            "reward_desirable": torch.where(desirable, rewards, 0.0),
            "reward_undesirable": torch.where(desirable, 0.0, rewards),
            "desirable": desirable.float(),
        }

    return statistics


def run(config: KTOConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data, settings = config.train, config.data, config.kto

    # Data: every row is read and checked, and both labels found, before any weights load.
    train_examples, eval_examples, report = load_examples(data, train.seed, feedback_examples)
    desirable, undesirable = label_counts(train_examples, f"{data.path} (training split)")
    source, tokenizer = resolve_with_tokenizer(config.model)
    train_set, counts = tokenize_feedback(tokenizer, train_examples, data.template, data.max_length, data.overlong)
    eval_set, _ = tokenize_feedback(tokenizer, eval_examples, data.template, data.max_length, data.overlong)
    print(f"data: {training_data_summary(report, counts, len(train_set), len(eval_set), 'labelled answers')}")
    note = balance_note(desirable, undesirable, settings.desirable_weight, settings.undesirable_weight)
    if note:
        print(note)
    answers = HeldOutAnswers(tokenizer, eval_examples, config)

    # Policy, reference and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora)
    frozen_copy = frozen_reference_copy(model, config.lora.enabled)
    share = shares_prompts(backbone_and_head(model)[0])
    batches = lambda examples, seed: feedback_batches(examples, train.batch_size, data.max_length, seed, share)  # noqa: E731
    batches_for_epoch = lambda epoch: batches(train_set, train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    if frozen_copy is not None:
        frozen_copy.to(engine.device)
    statistics = example_statistics(config, ReferencePolicy(engine, frozen_copy, train.loss_chunk_tokens))
    eval_batches = batches(eval_set, None)[: config.eval.max_batches]

    def loss_fn(model: torch.nn.Module, batch: FeedbackBatch) -> LossOutput:
        losses, stats = statistics(model, batch)
        logged = ("label_accuracy", "label_reward", "kl")  # per-label means are held-out metrics
        return LossOutput(losses.sum(), {name: stats[name].sum().item() for name in logged})

    def evaluate() -> dict[str, float]:
        """Means over the held-out answers (split over processes); rewards per label."""

        def sums_of(batch: FeedbackBatch) -> dict[str, float]:
            losses, stats = statistics(engine.model, batch)
            return {
                "examples": batch.num_examples,
                **{name: values.sum().item() for name, values in {"loss": losses, **stats}.items()},
            }

        sums = held_out_sums(engine, eval_batches, sums_of)
        examples, liked = sums.pop("examples"), sums.pop("desirable")
        disliked = examples - liked
        reward_desirable = sums.pop("reward_desirable") / max(liked, 1)
        reward_undesirable = sums.pop("reward_undesirable") / max(disliked, 1)
        return {
            **{name: total / max(examples, 1) for name, total in sums.items()},
            "reward_desirable": reward_desirable,
            "reward_undesirable": reward_undesirable,
            "margin": reward_desirable - reward_undesirable,
        }

    def answer_and_score() -> dict:
        return {**(evaluate() if eval_batches else {}), **answers(engine.model)}

    engine.resume(resume)

    # Train, measuring label agreement of the implicit reward (and the reward model's score of
    # answers) before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", answer_and_score)
    engine.fit(batches_for_epoch, loss_fn, evaluate if eval_batches else None)
    measure(engine, metrics, "after", answer_and_score)

    # Save.
    engine.save_final(tokenizer, config.model.name_or_path, {"stage": STAGE, "lora": config.lora.enabled})
    answers.write(engine, metrics)
    engine.complete(metrics, report.summary())
    return metrics
