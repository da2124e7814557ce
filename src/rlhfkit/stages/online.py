"""What the online RL stages (PPO, GRPO, TRPO) share: prompts → rollouts → rewards → an update.

Each step samples completions for a batch of prompts, scores them with the configured reward,
and hands both to the algorithm's `update`. The policy is the starting model with fresh LoRA
adapters; the reference policy is the same model with the adapters switched off (no second copy
of the weights), or a frozen copy when fully fine-tuning. A critic, when the algorithm has one,
lives beside the policy in one module, so one optimizer and one checkpoint hold both and an
interrupted run resumes with both intact. Before and after training, the mean reward and the
KL to the reference are measured on held-out prompts with the same sampling settings and seed.

Under several processes, each process samples, scores and trains on its own block of the
step's prompts — whole groups stay on one process, so group statistics are exact — and every
completion is drawn with its own seed (run seed, step, global index), so the rollout is the one a
single process would sample. Summaries are computed over all processes' completions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from rlhfkit.config import LoraSettings, RLConfig
from rlhfkit.critic import PolicyAndCritic
from rlhfkit.data.batching import example_order
from rlhfkit.data.examples import PromptExample, load_examples, prompt_examples, training_data_summary
from rlhfkit.data.formatting import fit_prompts, render_rl_prompt
from rlhfkit.engine import Engine, RunDir, process_state
from rlhfkit.losses.ppo import aggregation_units
from rlhfkit.metrics import held_out_curve, overoptimisation_signs
from rlhfkit.models import frozen_reference_copy, reference_policy, resolve, resolve_with_tokenizer
from rlhfkit.passes import response_logprobs
from rlhfkit.rewards import RewardSource, ScoredBatch, score_completions
from rlhfkit.rollout_copy import (
    COPY_ENGINES,
    PolicyCopy,
    answering_loop,
    build_copy,
    check_copy_usable,
    resolve_auto_engine,
)
from rlhfkit.sampling import Rollout, row_seed, sample_rollout
from rlhfkit.stages.before_after import measure, write_samples
from rlhfkit.stages.refill import refill_flat_groups
from rlhfkit.stages.rl_launch import check_process_count, check_sharded_launch, sharded_launch
from rlhfkit.stages.rl_measure import (
    add_paired_gains,
    check_group_column,
    evaluate_during_training,
    held_out_evaluation,
)
from rlhfkit.vllm_rollout import VLLMSampler, check_vllm_usable


@dataclass
class RolloutBatch:
    """A micro-batch of a rollout plus the per-sequence/per-token training targets of its rows."""

    rollout: Rollout
    tensors: dict[str, torch.Tensor]
    loss_units: int
    rows: torch.Tensor  # (b,) the rows of the full rollout this micro-batch holds

    @property
    def width(self) -> int:
        return self.rollout.response_ids.shape[1]

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(
            self.rollout.to(device), {k: v.to(device) for k, v in self.tensors.items()}, self.loss_units, self.rows
        )


def micro_batch(
    rollout: Rollout,
    tensors: dict[str, torch.Tensor],
    indices: torch.Tensor,
    aggregation: str,
    max_length: int | None = None,
) -> RolloutBatch:
    """Rows `indices`, with columns that hold only padding cut off (left of prompts, right of responses)."""
    picked = rollout.select(indices)
    prompt_start = int((picked.prompt_mask.sum(dim=0) > 0).float().argmax())
    width = max(1, int(picked.response_mask.sum(dim=1).max()))
    picked.prompt_ids, picked.prompt_mask = picked.prompt_ids[:, prompt_start:], picked.prompt_mask[:, prompt_start:]
    picked.response_ids, picked.response_mask = picked.response_ids[:, :width], picked.response_mask[:, :width]
    rows = {name: value[indices.to(value.device)] for name, value in tensors.items()}
    rows = {name: value[:, :width] if value.dim() >= 2 else value for name, value in rows.items()}
    return RolloutBatch(picked, rows, aggregation_units(rows["mask"], aggregation, max_length), indices)


def minibatch_groups(
    rollout: Rollout,
    tensors: dict[str, torch.Tensor],
    minibatch_size: int | None,
    micro_batch_size: int,
    aggregation: str,
    generator: torch.Generator,
    max_length: int | None = None,
) -> list[list[RolloutBatch]]:
    """Shuffled minibatches (one optimizer step each), each split into micro-batches (accumulated)."""
    count = rollout.size
    order = torch.randperm(count, generator=generator)
    size = minibatch_size or count
    groups = []
    for start in range(0, count, size):
        members = order[start : start + size]
        groups.append(
            [
                micro_batch(rollout, tensors, members[i : i + micro_batch_size], aggregation, max_length)
                for i in range(0, len(members), micro_batch_size)
            ]
        )
    return groups


def run_updates(
    engine: Engine,
    rollout: Rollout,
    targets: dict[str, torch.Tensor],
    epochs: int,
    minibatch_size: int | None,
    aggregation: str,
    step_seed: int,
    loss_fn,
    max_length: int | None = None,
) -> dict[str, float]:
    """`epochs` passes of optimizer steps over shuffled minibatches; returns the steps' mean metrics.

    `rollout` is this process's share; minibatch_size counts completions over all processes;
    max_length is the completion budget a constant loss normaliser uses.
    """
    generator = torch.Generator().manual_seed(step_seed)
    totals: dict[str, float] = {}
    steps = 0
    local_minibatch = minibatch_size // engine.num_processes if minibatch_size else None
    for _ in range(epochs):
        for group in minibatch_groups(
            rollout, targets, local_minibatch, engine.train.batch_size, aggregation, generator, max_length
        ):
            for name, value in engine.optimizer_step(group, loss_fn, already_split=True).items():
                totals[name] = totals.get(name, 0.0) + value
            steps += 1
    return {name: value / max(steps, 1) for name, value in totals.items() if name != "units"}


class RLSetup:
    """The pieces an algorithm needs: engine, config, tokenizer, policy, critic, and reference log-probs."""

    def __init__(
        self,
        config: RLConfig,
        engine: Engine,
        tokenizer,
        policy: torch.nn.Module,
        frozen_reference: torch.nn.Module | None,
    ) -> None:
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self.policy, self.frozen_reference = policy, frozen_reference
        self.critic: torch.nn.Module | None = None
        self.critic_reference: str | None = None  # the model the critic's weights or features come from
        self.temperature = config.rollout.temperature
        self.chunk = config.train.loss_chunk_tokens

    def build_critic(self, start_from: str | None) -> torch.nn.Module:
        """A value model: a one-output head on the backbone of `start_from` (default: the policy's start)."""
        reference = start_from or self.config.model.name_or_path
        critic_lora = LoraSettings(**{**self.config.lora.model_dump(), "dropout": 0.0})
        critic = self.engine.build_model(resolve(reference), self.config.model, critic_lora, reward_model=True)
        critic.config.pad_token_id = self.tokenizer.pad_token_id
        self.critic, self.critic_reference = critic, reference
        return critic

    def logprobs(self, policy: torch.nn.Module, rollout: Rollout, with_entropy: bool = False):
        with self.engine.autocast():
            return response_logprobs(policy, rollout, self.temperature, self.chunk, with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, with_hidden: bool = False):
        """log π_ref of the sampled tokens: the policy with adapters off, or the frozen copy.

        with_hidden: also return the reference's hidden states at the response positions (N, R, H).
        """
        with (
            self.engine.whole_weights(),
            self.engine.autocast(),
            reference_policy(self.policy, self.frozen_reference) as reference,
        ):
            logprobs, _, *hidden = response_logprobs(
                reference, rollout, self.temperature, self.chunk, with_hidden=with_hidden
            )
        return (logprobs, hidden[0]) if with_hidden else logprobs


class Algorithm(Protocol):
    """One RL algorithm: its optimizer steps per RL step and its update from a scored rollout."""

    optimizer_steps_per_step: int

    def update(self, rollout: Rollout, scored: ScoredBatch, step_seed: int) -> dict[str, float]: ...


def optimizer_steps_per_step(config: RLConfig, epochs: int, minibatch_size: int | None) -> int:
    batch = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    return epochs * math.ceil(batch / (minibatch_size or batch))


class Rollouts:
    """Where an RL step's completions come from: the step's prompts (a seeded shuffle per epoch, so a
    resumed run sees the same ones), this process's share of them, sampling (HF generate, or vLLM
    colocated on the GPU, or the int8 copy on the CPU) with a seed per completion, and the reward."""

    def __init__(
        self,
        config: RLConfig,
        engine: Engine,
        tokenizer,
        policy: torch.nn.Module,
        reward: RewardSource,
        train_examples: list[PromptExample],
        processes: int,
    ) -> None:
        self.config, self.engine, self.tokenizer, self.policy, self.reward = config, engine, tokenizer, policy, reward
        self.train_examples, self.processes = train_examples, processes
        self.sampler: VLLMSampler | PolicyCopy | None = None  # None: the policy samples itself
        settings = config.rollout
        if settings.engine == "vllm":
            self.sampler = VLLMSampler(
                policy,
                tokenizer,
                settings,
                config.data.max_length + settings.max_new_tokens,
                processes,
                config.train.seed,
                version=engine.progress.step,
            )
        elif settings.engine in COPY_ENGINES:  # int8: smoothed on the first training prompts, whatever the process
            calibration = [render_rl_prompt(tokenizer, example, config.data) for example in train_examples[:16]]
            self.sampler = build_copy(settings.engine, policy, tokenizer, calibration, config.data.max_length)

    def sample_and_score(
        self,
        examples: list[PromptExample],
        samples: int,
        seeds: list[int],
        greedy: bool = False,
        held_out: bool = False,
    ) -> tuple[Rollout, ScoredBatch]:
        """Completions of `examples` (`samples` each, one seed per completion) and their rewards;
        greedy: the most likely token at every step (top-k 1) instead of a sample. held_out: an
        evaluation's, answered by the engine only where it samples the policy's own distribution
        (vLLM, the float32 copy; not the int8 or bf16 copy), else by the float32 decode loop where
        it runs (the same distribution) or `generate`, so figures do not depend on the engine."""
        texts, settings, max_length = (
            [render_rl_prompt(self.tokenizer, example, self.config.data) for example in examples],
            self.config.rollout.model_copy(update={"top_k": 1}) if greedy else self.config.rollout,
            self.config.data.max_length,
        )
        sampler = self.sampler
        if held_out and sampler is not None and not sampler.samples_the_policy:
            sampler = None
        if sampler is None:
            with self.engine.whole_weights():
                loop = answering_loop(self.policy, "auto", max_length + settings.max_new_tokens) if held_out else None
                rollout = sample_rollout(
                    self.policy, self.tokenizer, texts, settings, samples, max_length, seeds, decode_loop=loop
                )
        else:  # the policy changes once per step: the sampler takes its weights when the step count moved
            rollout = sampler.sample(
                self.policy, self.engine.progress.step, texts, settings, samples, max_length, seeds
            )
        prompts = [examples[i].prompt for i in rollout.prompt_index.tolist()]
        columns = [examples[i].columns for i in rollout.prompt_index.tolist()]
        return rollout.to(self.engine.device), score_completions(
            self.reward, prompts, rollout.completions, columns, rollout.ended
        )

    def prompts_for(self, step: int) -> list[PromptExample]:
        count, per_step = len(self.train_examples), self.config.rollout.prompts_per_step
        positions = range(step * per_step, (step + 1) * per_step)
        orders = {
            epoch: example_order(count, self.config.train.seed + epoch) for epoch in {p // count for p in positions}
        }
        return [self.train_examples[orders[p // count][p % count]] for p in positions]

    def for_step(self, step: int) -> tuple[Rollout, ScoredBatch]:
        """This process's block of the step's prompts, each completion drawn with its own seed."""
        settings, seed = self.config.rollout, self.config.train.seed
        share, samples = settings.prompts_per_step // self.processes, settings.samples_per_prompt
        first = self.engine.accelerator.process_index * share
        seeds = [row_seed(seed, step, index) for index in range(first * samples, (first + share) * samples)]
        return self.sample_and_score(self.prompts_for(step)[first : first + share], samples, seeds)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def train_one_step(engine: Engine, algorithm: Algorithm, rollouts: Rollouts, seed: int) -> dict[str, float]:
    """Sample and score this step's rollout, update from it, and time both halves."""
    started = time.perf_counter()
    rollout, scored = rollouts.for_step(engine.progress.step)
    rounds, refilled = getattr(algorithm, "resample_rounds", 0), 0
    if rounds:  # DAPO: fresh prompts take the place of groups with one reward for all
        where = (engine.progress.step, engine.accelerator.process_index)
        rollout, scored, refilled = refill_flat_groups(rollouts, rollout, scored, rounds, *where)
    generated = time.perf_counter()
    step_metrics = algorithm.update(rollout, scored, seed + engine.progress.step)
    if rounds:
        step_metrics["refilled_groups"] = float(engine.sum_across_processes(torch.tensor([float(refilled)]))[0])
    step_metrics.update({"time_generation_s": generated - started, "time_update_s": time.perf_counter() - generated})
    return step_metrics


def run_online(
    config: RLConfig, stage: str, make_algorithm: Callable[[RLSetup], Algorithm], resume: bool = False
) -> dict:
    rollout = resolve_auto_engine(config.rollout, config.model.device, sharded_launch())
    config = config.model_copy(update={"rollout": rollout})
    check_sharded_launch(config, stage)
    processes = process_state(config.model.device).num_processes
    check_process_count(config, stage, processes, getattr(getattr(config, stage), "minibatch_size", None))
    if config.rollout.engine == "vllm":
        check_vllm_usable(config.model.device)
    run_dir = RunDir.open(config.train.output_dir, stage, config, resume)
    train = config.train

    # Prompts, tokenizer and the reward are loaded and checked before any policy weights.
    train_examples, eval_examples, report = load_examples(config.data, train.seed, prompt_examples)
    check_group_column(eval_examples[: config.eval.num_prompts], config.eval.group_by)
    source, tokenizer = resolve_with_tokenizer(config.model)
    reward = RewardSource(config.reward, config.data.template)
    judges = {
        name: RewardSource(settings, config.data.template, f"eval.judges.{name}")
        for name, settings in config.eval.judges.items()
    }
    train_examples, adjusted = fit_prompts(train_examples, tokenizer, config.data)
    eval_examples, _ = fit_prompts(eval_examples[: config.eval.num_prompts], tokenizer, config.data)
    summary = training_data_summary(report, adjusted, len(train_examples), len(eval_examples), "prompts")
    print(f"data: {summary}; reward: {reward.name}")
    if judges:
        print("held-out judges: " + ", ".join(f"{name} ({judge.name})" for name, judge in judges.items()))

    # Policy, reference, critic and the algorithm. TRPO steps the policy itself; the engine's
    # optimizer then trains only its critic.
    engine = Engine(train, config.model.device, run_dir, stage, find_unused_parameters=stage == "trpo")
    if config.rollout.engine in COPY_ENGINES:
        check_copy_usable(config.rollout.engine, engine.device)
    policy = engine.build_model(source, config.model, config.lora)
    frozen = frozen_reference_copy(policy, config.lora.enabled)
    setup = RLSetup(config, engine, tokenizer, policy, frozen)
    algorithm = make_algorithm(setup)
    total_steps = train.max_steps or train.epochs * math.ceil(len(train_examples) / config.rollout.prompts_per_step)
    engine.prepare(
        PolicyAndCritic(policy, setup.critic), total_steps, max(1, total_steps * algorithm.optimizer_steps_per_step)
    )
    engine.train_with_dropout = False  # no dropout: log-probs must match the rollout's on the first pass
    if frozen is not None:
        frozen.to(engine.device)
    engine.resume(resume)
    rollouts = Rollouts(config, engine, tokenizer, policy, reward, train_examples, processes)
    evaluate = held_out_evaluation(config, setup, rollouts, eval_examples, judges)

    # Train: sample -> score -> old/reference log-probs -> advantages -> update (the algorithm's) -> log.
    metrics = run_dir.read_json("metrics.json")
    # Evaluations after the checkpoint a run resumes from are measured again.
    metrics["during"] = [point for point in metrics.get("during", []) if point["step"] <= engine.progress.step]
    if config.eval.before and eval_examples:
        measure(engine, metrics, "before", evaluate)
    with engine.progress_bar() as bar:
        while engine.progress.step < total_steps:
            step_metrics = train_one_step(engine, algorithm, rollouts, train.seed)
            engine.progress.step += 1
            engine.log_step(step_metrics)
            reward_mean, kl, length = step_metrics["reward_mean"], step_metrics["kl"], step_metrics["length"]
            bar.set_postfix(reward=f"{reward_mean:.3f}", kl=f"{kl:.3f}", len=f"{length:.0f}")
            bar.update(1)
            if eval_examples and config.eval.every and engine.progress.step % config.eval.every == 0:
                if engine.progress.step < total_steps:  # the last step's is the evaluation after
                    evaluate_during_training(engine, metrics, evaluate)
            engine.checkpoint_if_due()
    engine.checkpoint_at_end()
    if eval_examples:
        measure(engine, metrics, "after", evaluate)
        add_paired_gains(metrics.get("before", {}), metrics["after"])
        metrics["steps"] = total_steps
        metrics["warnings"] = overoptimisation_signs(held_out_curve(metrics))
        for sign in metrics["warnings"]:
            warn(sign)

    # Save the policy (and the critic), the samples and the metrics.
    info = {"stage": stage, "lora": config.lora.enabled, "reward": reward.name}
    engine.save_final(tokenizer, config.model.name_or_path, info, model=policy)
    if setup.critic is not None:
        engine.save_final(
            tokenizer, setup.critic_reference, {**info, "role": "critic"}, model=setup.critic, name="critic"
        )
    if eval_examples:
        write_samples(engine, [e.prompt for e in eval_examples], metrics, [])
    engine.complete(metrics, report.summary())
    rollouts.close()
    return metrics


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}")
