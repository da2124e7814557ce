"""`rlhfkit evaluate`: compare models (base, SFT, aligned, ...) on the same held-out prompts.

Every model answers the same prompts with the same sampling settings and seed. Per model: response
perplexity and ROUGE-L against the held-out references, KL to the reference model on the model's
own answers, answer length and distinct-n (collapse), and — with a reward model — the mean reward
and the win rate against the baseline model. Signs of reward hacking are reported as warnings.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import torch

from rlhfkit.config import EvaluateConfig, ModelSettings
from rlhfkit.data.batching import packed_batches
from rlhfkit.data.examples import chat_examples, load_examples
from rlhfkit.data.formatting import render_prompt, tokenize_examples
from rlhfkit.engine import RunDir
from rlhfkit.engine.distributed import runs_on_cpu
from rlhfkit.errors import UserError
from rlhfkit.files import write_json_atomically, write_text_atomically
from rlhfkit.labeling.commands import llm_preferences
from rlhfkit.metrics import (
    describe,
    distinct_n,
    mean_and_stderr,
    rank_correlation,
    reward_hacking_signs,
    rouge_l,
    win_rate,
    write_side_by_side,
)
from rlhfkit.models import load_causal_lm, load_tokenizer, pick_dtype, resolve, same_model, training_info
from rlhfkit.passes import evaluate_perplexity, response_logprobs
from rlhfkit.report import evaluation_markdown
from rlhfkit.rewards import RewardModelScorer, RewardSource, score_completions
from rlhfkit.rollout_copy import answering_loop
from rlhfkit.sampling import sample_rollout
from rlhfkit.stages.sft import held_out_prompts

STAGE = "evaluate"


def same_vocabulary(tokenizer: Any, other: Any) -> bool:
    return tokenizer.get_vocab() == other.get_vocab()


@torch.inference_mode()
def measure_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    reference: tuple[torch.nn.Module, Any] | None,
    config: EvaluateConfig,
    eval_examples: list,
    prompt_turns: list,
    references: list[str],
    device: torch.device,
) -> tuple[dict[str, Any], list[str]]:
    """One model's metrics (all but the reward ones) and its answers, samples_per_prompt per prompt."""
    metrics: dict[str, Any] = {}
    tokens, _ = tokenize_examples(tokenizer, eval_examples, config.data.template, config.data.max_length, "truncate")
    batches = packed_batches(tokens, config.batch_size, seed=None)[: config.max_batches]
    if batches:
        metrics["perplexity"] = evaluate_perplexity(model, batches, device, config.loss_chunk_tokens)["perplexity"]

    texts = [render_prompt(tokenizer, turns, config.data.template) for turns in prompt_turns]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        length = config.max_prompt_length + config.sampling.max_new_tokens
        rollout = sample_rollout(
            model,
            tokenizer,
            texts,
            config.sampling,
            config.samples_per_prompt,
            config.max_prompt_length,
            decode_loop=answering_loop(model, config.sampling.engine, length),
        )
    answers = rollout.completions
    rollout = rollout.to(device)
    first_answers = answers[:: config.samples_per_prompt]
    if references:
        metrics["rouge_l"] = rouge_l(first_answers[: len(references)], references)

    if reference is not None:
        # Σ_t log π(y_t|·) − log π_ref(y_t|·) over the model's own samples: an unbiased estimate of
        # the sequence-level KL(π ‖ π_ref) at the sampling temperature, as the RL stages report it.
        temperature, chunk = config.sampling.temperature, config.loss_chunk_tokens
        logprobs, _ = response_logprobs(model, rollout, temperature, chunk)
        ref_logprobs, _ = response_logprobs(reference[0], rollout, temperature, chunk)
        per_answer = ((logprobs - ref_logprobs) * rollout.response_mask).sum(dim=1)
        metrics["kl"], metrics["kl_stderr"] = mean_and_stderr(per_answer.tolist())
    lengths = rollout.lengths.tolist()
    metrics["length"], metrics["length_stderr"] = mean_and_stderr(lengths)
    metrics["sample_lengths"] = lengths
    metrics["eos_fraction"] = float(rollout.ended.float().mean())
    metrics["distinct_1"], metrics["distinct_2"] = distinct_n(answers, 1), distinct_n(answers, 2)
    return metrics, answers


def score_answers(judge: RewardSource, prompts: list, answers: list[str]) -> list[float | None]:
    """A judge's score of each answer, None where it gave none (its on_invalid: skip)."""
    ended = torch.ones(len(answers), dtype=torch.bool)  # no EOS penalty: answers are compared, not trained on
    return score_completions(judge, prompts, answers, [{}] * len(answers), ended).per_answer()


def judge_summary(values: list[float | None], baseline: list[float | None] | None, tie_margin: float) -> dict:
    """A model's mean score by one judge and, against the baseline's answers, its win rate."""
    mean, stderr = mean_and_stderr([value for value in values if value is not None])
    summary = {"reward_mean": mean, "reward_stderr": stderr, "sample_rewards": values}
    if baseline is not None:
        pairs = [(a, b) for a, b in zip(values, baseline) if a is not None and b is not None]
        if pairs:
            summary.update(win_rate([a for a, _ in pairs], [b for _, b in pairs], tie_margin))
    return summary


def length_correlations(results: dict[str, dict], judges: list[str], reward_model: bool) -> dict[str, dict]:
    """Each judge's (and the reward model's) Spearman correlation of score with answer length in
    tokens: pooled over every model's answers (`rho`), and within each model's own (`per_model`).
    The pooled figure also follows which model wrote an answer (a base model's long, cut-off
    answers scoring low); within one model, length is what varies."""
    scored = {judge: {name: m["judges"][judge]["sample_rewards"] for name, m in results.items()} for judge in judges}
    if reward_model:
        scored["reward_model"] = {name: m["sample_rewards"] for name, m in results.items()}

    def scored_lengths(name: str, scores: list) -> list[tuple[int, float]]:
        return [(n, s) for n, s in zip(results[name]["sample_lengths"], scores) if s is not None]

    def rho(pairs: list[tuple[int, float]]) -> float:
        return rank_correlation([n for n, _ in pairs], [s for _, s in pairs])

    correlations = {}
    for judge, per_model in scored.items():
        own = {name: scored_lengths(name, scores) for name, scores in per_model.items()}
        pooled = [pair for pairs in own.values() for pair in pairs]
        correlations[judge] = {
            "rho": rho(pooled),
            "answers": len(pooled),
            "per_model": {name: rho(pairs) for name, pairs in own.items()},
        }
    return correlations


def run(config: EvaluateConfig, resume: bool = False) -> dict:
    """Evaluate every model in config.models; writes metrics.json and samples.{md,jsonl} to config.output_dir."""
    run_dir = RunDir.start_untrained(config.output_dir, STAGE, config)

    # Held-out data and every model reference are checked before weights load.
    _, eval_examples, report = load_examples(config.data, config.seed, chat_examples)
    prompt_turns, references = held_out_prompts(eval_examples, config.num_prompts)
    prompt_turns += [({"role": "user", "content": text},) for text in config.extra_prompts]
    if not prompt_turns:
        raise UserError(
            f"evaluate: no prompts ({config.data.path} has no held-out conversations and extra_prompts is empty)"
        )
    sources = {name: resolve(reference) for name, reference in config.models.items()}
    device = torch.device("cpu" if runs_on_cpu(config.device) else "cuda")
    dtype = pick_dtype(config.dtype, device)
    settings = ModelSettings(dtype=config.dtype, device=config.device)
    print(
        f"evaluate: {len(config.models)} models on {len(prompt_turns)} prompts x {config.samples_per_prompt} "
        f"({len(references)} with references); data: {report.summary()}"
    )

    def load(name: str) -> tuple[torch.nn.Module, Any]:
        return load_causal_lm(sources[name], settings, dtype).to(device).eval(), load_tokenizer(sources[name])

    reference = load(config.reference_name)
    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name in config.models:
        model, tokenizer = reference if name == config.reference_name else load(name)
        against = reference if same_vocabulary(tokenizer, reference[1]) else None
        if against is None:
            print(
                f"warning: {name} and the reference {config.reference_name} have different vocabularies; KL is not measured"
            )
        results[name], answers[name] = measure_policy(
            model, tokenizer, against, config, eval_examples, prompt_turns, references, device
        )
        print(f"{name}: {describe(results[name])}")
        del model
    del reference

    prompts_per_answer = [turns for turns in prompt_turns for _ in range(config.samples_per_prompt)]
    if config.reward_model:
        scorer = RewardModelScorer(config.reward_model, template=config.data.template, device=str(device))
        scores = {name: scorer.score(prompts_per_answer, answers[name]) for name in config.models}
        del scorer
        for name, values in scores.items():
            results[name]["reward_mean"], results[name]["reward_stderr"] = mean_and_stderr(values)
            results[name]["sample_rewards"] = values
            if name != config.baseline_name:
                results[name].update(win_rate(values, scores[config.baseline_name], config.tie_margin))

    for judge_name, judge_settings in config.judges.items():
        judge = RewardSource(judge_settings, config.data.template, f"judges.{judge_name}")
        judged = {name: score_answers(judge, prompts_per_answer, answers[name]) for name in config.models}
        del judge
        for name, values in judged.items():
            results[name].setdefault("judges", {})[judge_name] = judge_summary(
                values, judged[config.baseline_name] if name != config.baseline_name else None, config.tie_margin
            )
    # A judge a model was trained against (an RL stage's reward) is no held-out evidence for it.
    judge_references = {"reward_model": config.reward_model} | {
        name: settings.model or settings.function for name, settings in config.judges.items()
    }
    for name in config.models:
        reward = training_info(sources[name]).get("reward")
        marked = [judge for judge, ref in judge_references.items() if reward and ref and same_model(ref, reward)]
        if marked:
            results[name]["trained_against"] = marked

    if config.judge:
        judge_source = resolve(config.judge)
        judge_model = load_causal_lm(judge_source, settings, dtype).to(device).eval()
        judge_tokenizer = load_tokenizer(judge_source)
        questions = [turns[-1]["content"] for turns in prompts_per_answer]
        for name in config.models:
            if name != config.baseline_name:
                preference = llm_preferences(
                    judge_model, judge_tokenizer, questions, answers[name], answers[config.baseline_name]
                )
                outcome = win_rate(preference, [0.5] * len(preference), config.judge_tie_margin)
                results[name].update({f"judge_{key}": value for key, value in outcome.items()})
        del judge_model

    warnings = {}
    for name, metrics in results.items():
        signs = (
            reward_hacking_signs(metrics, results[config.baseline_name], config.warn)
            if name != config.baseline_name
            else []
        )
        if signs:
            warnings[name] = signs
            print(f"warning: possible reward hacking by {name}: " + "; ".join(signs))

    summary = {
        "models": results,
        "order": list(config.models),
        "references": dict(config.models),
        "baseline": config.baseline_name,
        "reference": config.reference_name,
        "reward_model": config.reward_model,
        "tie_margin": config.tie_margin,
        "judge": config.judge,
        "judges": {name: settings.model or settings.function for name, settings in config.judges.items()},
        "length_correlation": length_correlations(results, list(config.judges), bool(config.reward_model)),
        "prompts": len(prompt_turns),
        "prompts_with_references": len(references),
        "samples_per_prompt": config.samples_per_prompt,
        "warnings": warnings,
        "sampling": config.sampling.model_dump(),
        "data": report.summary(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    write_json_atomically(run_dir.root / "metrics.json", summary)
    columns = {name: answers[name][:: config.samples_per_prompt] for name in config.models}
    prompts = [turns[-1]["content"] for turns in prompt_turns]
    write_side_by_side(run_dir.root, prompts, columns, list(references) + [None] * (len(prompts) - len(references)))
    table = evaluation_markdown(summary)
    write_text_atomically(run_dir.root / "metrics.md", table)
    print(table, end="")
    run_dir.write_marker(STAGE, "complete")
    return summary
