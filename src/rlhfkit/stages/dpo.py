"""`rlhfkit dpo`: direct preference optimisation of a policy on preference pairs.

The policy is the starting model (usually an SFT run) with fresh LoRA adapters; the reference
policy is that same model with the adapters switched off, so no second copy of the weights
exists (a frozen copy is kept only when fully fine-tuning). Chosen and rejected answers of a
batch are packed into one padding-free row and go through one forward pass, each pair's prompt
stored once when the model runs rlhfkit's attention (data/batching.py); per-token log-probs
are gathered in chunks without a full [tokens, vocab] tensor. Loss variants: DPO (sigmoid, with
optional label smoothing), IPO, SimPO, and ORPO (the SFT loss plus an odds-ratio term).
"""

from __future__ import annotations

import torch

from rlhfkit.attention import shares_prompts
from rlhfkit.config import DPOConfig
from rlhfkit.data.batching import PairBatch, pair_batches
from rlhfkit.data.examples import load_examples, preference_examples, training_data_summary
from rlhfkit.data.formatting import tokenize_pairs
from rlhfkit.engine import Engine, LossOutput, RunDir, steps_for
from rlhfkit.engine.held_out import held_out_share, held_out_sums
from rlhfkit.losses.dpo import DPOLoss, dpo_family_loss, implicit_rewards
from rlhfkit.metrics import agreement
from rlhfkit.models import backbone_and_head, frozen_reference_copy, reference_policy, resolve_with_tokenizer
from rlhfkit.passes import answer_logps
from rlhfkit.stages.before_after import HeldOutAnswers, measure

STAGE = "dpo"


class ReferencePolicy:
    """Reference log-probs: the policy with its adapters disabled, or a frozen copy; optionally a table."""

    def __init__(self, engine: Engine, frozen_copy: torch.nn.Module | None, chunk_size: int) -> None:
        self.engine, self.frozen_copy, self.chunk_size = engine, frozen_copy, chunk_size
        self.table: torch.Tensor | None = None  # (N, 2) precomputed [chosen, rejected] per training pair

    @torch.no_grad()
    def compute(self, batch: PairBatch, training_pairs: bool) -> torch.Tensor:
        """(2B,) reference answer log-probs; from the precomputed table for batches of training pairs."""
        if self.table is not None and training_pairs:
            rows = self.table[batch.pair_ids.cpu()]  # (B, 2)
            return torch.cat([rows[:, 0], rows[:, 1]]).to(self.engine.device)
        with reference_policy(self.engine.model, self.frozen_copy) as reference:
            return answer_logps(reference, batch, self.chunk_size)

    def precompute(self, batches: list[PairBatch], num_pairs: int) -> None:
        """The table, each batch computed by one process of the launch; each entry is written by
        one process, so summing over them assembles it."""
        table = torch.zeros(num_pairs, 2)
        for batch, counted in held_out_share(self.engine, batches):
            with self.engine.autocast():  # as the training passes that read the table (train.mixed_precision)
                logps = self.compute(batch, training_pairs=False).cpu()
            if counted:
                pair_ids = batch.pair_ids.cpu()
                table[pair_ids, 0], table[pair_ids, 1] = logps[: batch.num_pairs], logps[batch.num_pairs :]
        self.table = self.engine.sum_across_processes(table)


def pair_statistics(config: DPOConfig, reference: ReferencePolicy | None):
    """Per-pair DPO loss and diagnostics of a batch, shared by training and evaluation."""
    loss_type, settings = DPOLoss(config.dpo.loss), config.dpo

    def statistics(
        model: torch.nn.Module, batch: PairBatch, training_pairs: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = batch.num_pairs
        logps = answer_logps(model, batch, config.train.loss_chunk_tokens)  # (2B,)
        ref = reference.compute(batch, training_pairs) if reference is not None else None
        lengths = batch.answer_lengths.float()
        chosen, rejected, len_chosen, len_rejected = logps[:pairs], logps[pairs:], lengths[:pairs], lengths[pairs:]
        ref_chosen, ref_rejected = (ref[:pairs], ref[pairs:]) if ref is not None else (None, None)
        losses = dpo_family_loss(
            loss_type,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            len_chosen,
            len_rejected,
            settings.beta,
            settings.label_smoothing,
            settings.simpo_gamma,
        )
        reward_chosen = implicit_rewards(chosen.detach(), ref_chosen, settings.beta, len_chosen)
        reward_rejected = implicit_rewards(rejected.detach(), ref_rejected, settings.beta, len_rejected)
        margin = reward_chosen - reward_rejected
        return losses, {
            "accuracy": agreement(margin),
            "margin": margin,
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }

    return statistics


def run(config: DPOConfig, resume: bool = False) -> dict:
    run_dir = RunDir.open(config.train.output_dir, STAGE, config, resume)
    train, data = config.train, config.data

    # Data: every row is read and checked before any weights load.
    train_examples, eval_examples, report = load_examples(data, train.seed, preference_examples)
    source, tokenizer = resolve_with_tokenizer(config.model)
    train_pairs, counts = tokenize_pairs(tokenizer, train_examples, data.template, data.max_length, data.overlong)
    eval_pairs, _ = tokenize_pairs(tokenizer, eval_examples, data.template, data.max_length, data.overlong)
    print(f"data: {training_data_summary(report, counts, len(train_pairs), len(eval_pairs), 'pairs')}")
    answers = HeldOutAnswers(tokenizer, eval_examples, config)

    # Policy, reference and optimiser.
    engine = Engine(train, config.model.device, run_dir, STAGE)
    model = engine.build_model(source, config.model, config.lora)
    frozen_copy = frozen_reference_copy(model, config.lora.enabled)
    reference = (
        None
        if DPOLoss(config.dpo.loss).reference_free
        else ReferencePolicy(engine, frozen_copy, train.loss_chunk_tokens)
    )
    share = shares_prompts(backbone_and_head(model)[0])
    batches = lambda pairs, seed: pair_batches(pairs, train.batch_size, seed, share)  # noqa: E731
    batches_for_epoch = lambda epoch: batches(train_pairs, train.seed + epoch)  # noqa: E731
    engine.prepare(model, steps_for(len(batches_for_epoch(0)), train))
    if frozen_copy is not None:
        frozen_copy.to(engine.device)
    statistics = pair_statistics(config, reference)
    eval_batches = batches(eval_pairs, None)[: config.eval.max_batches]

    def loss_fn(model: torch.nn.Module, batch: PairBatch) -> LossOutput:
        losses, stats = statistics(model, batch, training_pairs=True)
        return LossOutput(losses.sum(), {name: values.sum().item() for name, values in stats.items()})

    def evaluate() -> dict[str, float]:
        """Per-pair means of the loss and statistics over the held-out pairs (split over processes)."""

        def sums_of(batch: PairBatch) -> dict[str, float]:
            losses, stats = statistics(engine.model, batch, training_pairs=False)
            return {
                "pairs": batch.num_pairs,
                **{name: values.sum().item() for name, values in {"loss": losses, **stats}.items()},
            }

        sums = held_out_sums(engine, eval_batches, sums_of)
        pairs = sums.pop("pairs")
        return {name: total / max(pairs, 1) for name, total in sums.items()}

    def answer_and_score() -> dict:
        return {**(evaluate() if eval_batches else {}), **answers(engine.model)}

    engine.resume(resume)
    if reference is not None and config.dpo.precompute_reference:
        with engine.whole_weights():
            reference.precompute(batches(train_pairs, None), len(train_pairs))

    # Train, measuring implicit-reward accuracy (and the reward model's score of answers) before and after.
    metrics = run_dir.read_json("metrics.json")
    if config.eval.before:
        measure(engine, metrics, "before", answer_and_score)
    engine.fit(batches_for_epoch, loss_fn, evaluate if eval_batches else None)
    measure(engine, metrics, "after", answer_and_score)

    # Save.
    engine.save_final(
        tokenizer, config.model.name_or_path, {"stage": STAGE, "lora": config.lora.enabled, "loss": config.dpo.loss}
    )
    answers.write(engine, metrics)
    engine.complete(metrics, report.summary())
    return metrics
