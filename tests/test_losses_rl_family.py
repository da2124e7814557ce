"""The critic-free RL family's objectives: by hand, and against TRL's GRPOTrainer / RLOOTrainer losses."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from rlhfkit.losses.advantages import (
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    spread_groups,
)
from rlhfkit.losses.grpo import grpo_per_token_loss, importance_log_weights
from rlhfkit.losses.ppo import aggregate_loss


def flat(tensor: torch.Tensor) -> list[float]:
    return tensor.detach().flatten().tolist()


def test_rloo_baseline_is_the_mean_of_the_other_completions():
    advantages = rloo_advantages(torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 4.0]), 3)
    # prompt 1: 3 − (0+0)/2 = 3, 0 − (3+0)/2 = −1.5 (twice); prompt 2: 1 − 2.5, 1 − 2.5, 4 − 1
    assert advantages.tolist() == [3.0, -1.5, -1.5, -1.5, -1.5, 3.0]
    with pytest.raises(ValueError, match="at least 2 completions"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)


def test_reinforce_pp_returns_are_kl_shaped_and_whitened_over_the_batch():
    scores, mask = torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2], [0.3, 7.0]])  # 7.0 is padding: never counted
    advantages = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5)
    # r = [[−0.05, −0.1 + 1], [−0.15]]; returns G = [[0.85, 0.9], [−0.15]]; whitened over the 3 tokens
    returns = [0.85, 0.9, -0.15]
    mean = sum(returns) / 3
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 3)
    expected = [(g - mean) / std for g in returns]
    assert advantages[0].tolist() == pytest.approx(expected[:2], abs=1e-5)
    assert advantages[1, 0].item() == pytest.approx(expected[2], abs=1e-5) and advantages[1, 1] == 0
    # the group variant subtracts each prompt's mean score first: [1, 0] -> [0.5, −0.5]
    grouped = reinforce_pp_advantages(scores, kl, mask, 0.5, group_size=2)
    returns = [-0.05 - 0.1 + 0.5, -0.1 + 0.5, -0.15 - 0.5]
    mean = sum(returns) / 3
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 3)
    assert grouped[mask.bool()].tolist() == pytest.approx([(g - mean) / std for g in returns], abs=1e-5)


def test_reinforce_pp_whitens_over_every_process_of_the_batch():
    """Two halves of a batch on two "processes" (threads whose reduce is an all-reduce) get the
    advantages the whole batch gets on one."""
    import threading

    scores, kl = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    whole = reinforce_pp_advantages(scores, kl, mask, 0.1)
    slots, barrier, results = [None, None], threading.Barrier(2), [None, None]

    def process(rank):
        def all_reduce(local):
            slots[rank] = local
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        part = slice(2 * rank, 2 * rank + 2)
        results[rank] = reinforce_pp_advantages(scores[part], kl[part], mask[part], 0.1, reduce=all_reduce)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.cat(results).flatten().tolist() == pytest.approx(whole.flatten().tolist(), abs=1e-6)
    alone = reinforce_pp_advantages(scores[:2], kl[:2], mask[:2], 0.1)  # one half normalised by itself
    assert alone.flatten().tolist() != pytest.approx(whole[:2].flatten().tolist())


def test_dapo_overlong_penalty_falls_linearly_over_the_buffer():
    lengths = torch.tensor([3, 6, 8, 10])
    assert overlong_penalty(lengths, max_new_tokens=10, buffer=4).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 4, factor=2.0).tolist() == [0.0, 0.0, -1.0, -2.0]
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 10, 11)


def test_spread_groups_are_those_with_different_rewards():
    assert spread_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True, False]


def test_importance_levels_by_hand():
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.2, 0.4], [0.6, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert flat(importance_log_weights(new, old, mask, "token")) == pytest.approx([0.2, 0.4, 0.6, 9.0])
    assert flat(importance_log_weights(new, old, mask, "sequence")) == pytest.approx([0.3, 0.3, 0.6, 0.6])
    assert flat(importance_log_weights(new, old, mask, "sequence_sum")) == pytest.approx([0.6, 0.6, 0.6, 0.6])
    token_level = importance_log_weights(new, old, mask, "sequence_token")
    assert flat(token_level) == pytest.approx([0.3, 0.3, 0.6, 0.6])
    (token_level * torch.tensor([[1.0, 2.0], [3.0, 0.0]])).sum().backward()
    assert new.grad.tolist() == [[1.0, 2.0], [3.0, 0.0]]  # each token's own gradient, not the sequence mean's


def test_clip_higher_lets_a_rising_token_go_further():
    logprobs, old = torch.log(torch.tensor([[1.3, 0.7]])), torch.zeros(1, 2)
    loss, clipped, _ = grpo_per_token_loss(logprobs, old, None, torch.tensor([1.0]), 0.2, 0.0)
    assert flat(loss) == pytest.approx([-1.2, -0.7]) and clipped.tolist() == [[1.0, 0.0]]
    loss, clipped, _ = grpo_per_token_loss(logprobs, old, None, torch.tensor([1.0]), 0.2, 0.0, clip_high=0.28)
    assert flat(loss) == pytest.approx([-1.28, -0.7])
    loss, clipped, _ = grpo_per_token_loss(logprobs, old, None, torch.tensor([-1.0]), 0.2, 0.0, clip_high=0.28)
    assert flat(loss) == pytest.approx([1.3, 0.8]) and clipped.tolist() == [[0.0, 1.0]]  # ε_low still 0.2


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    logprobs = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.5) - 2.0]])  # ratio e² ≈ 7.39, beyond ε_max = 5
    loss, clipped, _ = grpo_per_token_loss(logprobs, old, None, torch.tensor([2.0]), 0.2, 0.0, objective="cispo")
    assert loss.item() == pytest.approx(-5.0 * 2.0 * math.log(0.5)) and clipped.item() == 1.0
    loss.sum().backward()
    assert logprobs.grad.item() == pytest.approx(-10.0)  # −sg(5)·A: the clipped surrogate's would be 0
    clipped_loss, _, _ = grpo_per_token_loss(
        logprobs.detach().requires_grad_(), old, None, torch.tensor([2.0]), 0.2, 0.0
    )
    assert clipped_loss.item() == pytest.approx(-2.0 * 1.2)


def test_constant_aggregation_divides_by_completions_times_the_budget():
    per_token, mask = torch.ones(3, 3), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    total, units = aggregate_loss(per_token, mask, "constant", max_length=4)
    assert total.item() == 3.0 and units == 2 * 4  # the empty completion counts for nothing
    with pytest.raises(ValueError, match="needs max_length"):
        aggregate_loss(per_token, mask, "constant")


# ---- against TRL ---------------------------------------------------------------------------


def _case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, width = 4, 5
    logprobs = -torch.rand(batch, width, generator=generator) * 2
    old = logprobs + (torch.rand(batch, width, generator=generator) - 0.5) * 0.8  # ratios in about [0.67, 1.5]
    ref = logprobs + (torch.rand(batch, width, generator=generator) - 0.5) * 0.4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2])
    return logprobs, old, ref, mask, advantages


def _stand_in_trainer(trainer_class, logprobs, **attributes):
    identity = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    model = types.SimpleNamespace(training=True)
    stand_in = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(
            gather=identity, gather_for_metrics=identity, reduce=identity, num_processes=1, sync_gradients=True
        ),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=1,
        **attributes,
    )
    return stand_in, model


def trl_grpo_loss(loss_type, level, epsilon_high, beta, logprobs, old, ref, mask, advantages):
    """TRL's GRPOTrainer._compute_loss on these log-probs (the model is a stand-in returning them)."""
    from trl import GRPOTrainer

    trainer, model = _stand_in_trainer(
        GRPOTrainer,
        logprobs,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        max_completion_length=mask.shape[1],
        _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    batch = logprobs.shape[0]
    inputs = {
        "prompt_ids": torch.ones(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.ones(batch, mask.shape[1], dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return float(GRPOTrainer._compute_loss(trainer, model, inputs))


def ours(logprobs, old, ref, mask, advantages, aggregation, beta, **options) -> float:
    per_token, _, _ = grpo_per_token_loss(logprobs, old, ref, advantages, 0.2, beta, mask=mask, **options)
    total, units = aggregate_loss(per_token, mask, aggregation, max_length=mask.shape[1])
    return float(total / units)


@pytest.mark.parametrize(
    "loss_type, level, epsilon_high, aggregation, options",
    [
        ("grpo", "token", 0.2, "sequence", {}),  # GRPO
        ("dapo", "token", 0.28, "token", {"clip_high": 0.28}),  # DAPO: clip-higher, token-level loss
        ("dr_grpo", "token", 0.2, "constant", {}),  # Dr. GRPO's constant normaliser
        ("grpo", "sequence", 0.2, "sequence", {"level": "sequence"}),  # GSPO
        ("cispo", "token", 5.0, "token", {"objective": "cispo", "max_weight": 5.0}),  # CISPO
    ],
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_family_matches_trls_grpo_trainer_loss(loss_type, level, epsilon_high, aggregation, options, beta):
    for seed in range(3):
        logprobs, old, ref, mask, advantages = _case(seed)
        expected = trl_grpo_loss(loss_type, level, epsilon_high, beta, logprobs, old, ref, mask, advantages)
        assert ours(logprobs, old, ref, mask, advantages, aggregation, beta, **options) == pytest.approx(
            expected, rel=1e-5, abs=1e-7
        ), seed


def test_rloos_loss_matches_trls_rloo_trainer():
    from trl import RLOOTrainer

    logprobs, old, _, mask, _ = _case(1)
    old = logprobs + (old - logprobs) * 0.2  # whole-sequence ratios stay near 1, inside and outside the clip
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    advantages = rloo_advantages(rewards, 2)
    trainer, model = _stand_in_trainer(RLOOTrainer, logprobs, epsilon_low=0.2, epsilon_high=0.2)
    inputs = {
        "prompt_ids": torch.ones(4, 1, dtype=torch.long),
        "prompt_mask": torch.ones(4, 1, dtype=torch.long),
        "completion_ids": torch.ones(4, 5, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_logps": (old * mask).sum(1),
    }
    expected = float(RLOOTrainer._compute_loss(trainer, model, inputs))
    assert ours(logprobs, old, None, mask, advantages, "sequence", 0.0, level="sequence_sum") == pytest.approx(
        expected, rel=1e-5
    )


def test_rollout_correction_by_hand():
    from rlhfkit.losses.grpo import rollout_correction

    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.1, 0.5, 0.4]]))  # trainer/sampler ratios 5, 1, 1.25
    mask = torch.ones(1, 3)
    weights, kept = rollout_correction(old, sampler, mask, "tis", cap=2.0)
    assert flat(weights) == pytest.approx([2.0, 1.0, 1.25]) and flat(kept) == [1.0, 1.0, 1.0]
    weights, kept = rollout_correction(old, sampler, mask, "mask_token", cap=2.0)
    assert flat(weights) == pytest.approx([0.0, 1.0, 1.25]) and flat(kept) == [0.0, 1.0, 1.0]
    # the completion's geometric-mean ratio is 6.25^(1/3) ≈ 1.84: inside [1/2, 2], outside [1/1.5, 1.5]
    weights, kept = rollout_correction(old, sampler, mask, "mask_sequence", cap=2.0)
    assert flat(weights) == pytest.approx([2.0, 1.0, 1.25]) and flat(kept) == [1.0, 1.0, 1.0]
    weights, kept = rollout_correction(old, sampler, mask, "mask_sequence", cap=1.5)
    assert flat(weights) == [0.0, 0.0, 0.0] and flat(kept) == [0.0, 0.0, 0.0]


def test_weights_scale_the_policy_term_only():
    logprobs, old, ref = torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), -1.0)
    weights = torch.tensor([[2.0, 0.0]])
    plain, _, kl = grpo_per_token_loss(logprobs, old, ref, torch.tensor([1.0]), 0.2, 0.5)
    weighted, _, _ = grpo_per_token_loss(logprobs, old, ref, torch.tensor([1.0]), 0.2, 0.5, weights=weights)
    assert flat(weighted) == pytest.approx([2 * -1.0 + 0.5 * kl[0, 0].item(), 0.5 * kl[0, 1].item()])
    assert flat(plain) == pytest.approx([-1.0 + 0.5 * kl[0, 0].item(), -1.0 + 0.5 * kl[0, 1].item()])


def test_the_grpo_stage_weights_and_drops_by_the_samplers_log_probs():
    from rlhfkit.config.loading import load_config
    from rlhfkit.stages.grpo import GRPO

    config = load_config(
        "grpo", None, ["rollout.engine=vllm", "rollout.correction=mask_token", "rollout.correction_cap=2"]
    )
    context = types.SimpleNamespace(config=config, engine=types.SimpleNamespace(sum_across_processes=lambda t: t))
    algorithm = GRPO(context)
    assert not algorithm.on_policy  # the behaviour log-probs are measured before the update
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.1, 0.5, float("nan")], [0.4, 0.5, 0.5]]))  # NaN: an EOS vLLM did not return
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    correction, weights, kept = algorithm.correct_for_the_sampler(
        types.SimpleNamespace(sampler_logprobs=sampler), logprobs, mask
    )
    assert flat(kept) == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0] and flat(weights)[:3] == pytest.approx([0, 1, 1])
    assert correction == {"correction_fraction": pytest.approx(1 / 5)}  # one of the 5 response tokens dropped


def test_every_rollout_summary_reports_the_samplers_kl_to_the_trainer():
    from rlhfkit.rewards import ScoredBatch
    from rlhfkit.sampling import Rollout
    from rlhfkit.stages.rl_measure import rollout_summary

    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.1, 0.5, float("nan")], [0.4, 0.5, 0.5]]))  # NaN: an EOS vLLM did not return
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rollout = Rollout(
        *(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)),
        *(torch.ones(2, 3, dtype=torch.long), mask, torch.ones(2, dtype=torch.bool), torch.arange(2), ["a", "b"]),
    )
    scored = ScoredBatch(scores=torch.zeros(2), valid=torch.ones(2, dtype=torch.bool), raw_mean=0.0, skipped=0)
    assert "sampler_kl" not in rollout_summary(rollout, scored, logprobs, logprobs, None)
    rollout.sampler_logprobs = sampler
    expected_kl = (math.log(0.1 / 0.5) + 0 + 0 + math.log(0.4 / 0.5) + 0) / 5  # k1 over the 5 response tokens
    assert rollout_summary(rollout, scored, logprobs, logprobs, None)["sampler_kl"] == pytest.approx(expected_kl)


def test_vllm_log_probs_line_up_with_the_response_rows():
    from rlhfkit.vllm_rollout import response_rows, sampler_logprob_rows

    def output(ids, logprobs, finish_reason):
        entries = [{token: types.SimpleNamespace(logprob=value)} for token, value in zip(ids, logprobs)]
        return types.SimpleNamespace(
            outputs=[types.SimpleNamespace(token_ids=ids, logprobs=entries, finish_reason=finish_reason)]
        )

    outputs = [output([5, 6], [-0.5, -1.5], "stop"), output([7, 8, 9], [-0.1, -0.2, -0.3], "length")]
    rows = response_rows(outputs, eos_token_id=2)  # the first stopped without returning EOS: it is appended
    table = sampler_logprob_rows(outputs, rows)
    assert rows == [[5, 6, 2], [7, 8, 9]]
    assert (
        table[0, :2].tolist() == [-0.5, -1.5]
        and math.isnan(table[0, 2])
        and table[1].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    )
