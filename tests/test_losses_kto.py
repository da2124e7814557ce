"""KTO's loss and reference point: by hand, its properties, and against TRL's KTOTrainer."""

import collections
import types

import pytest
import torch

from rlhfkit.losses.kto import kto_loss, kto_reference_point


def test_kto_by_hand():
    # Mismatched answers: log π − log π_ref = −20 − (−20.5) = 0.5 and −21 − (−21.5) = 0.5, so z₀ = 0.5.
    z = kto_reference_point(torch.tensor([-20.0, -21.0]), torch.tensor([-20.5, -21.5]))
    assert z.item() == pytest.approx(0.5)
    # 👍 with r = −10 − (−11) = 1:   1 − σ(0.1 · (1 − 0.5))  = 1 − σ(0.05) = 0.487503
    # 👎 with r = −12 − (−11) = −1:  1 − σ(0.1 · (0.5 + 1)) = 1 − σ(0.15) = 0.462570, × λ_U 1.5 = 0.693855
    losses = kto_loss(
        torch.tensor([-10.0, -12.0]),
        torch.tensor([-11.0, -11.0]),
        torch.tensor([True, False]),
        z,
        beta=0.1,
        undesirable_weight=1.5,
    )
    torch.testing.assert_close(losses, torch.tensor([0.487503, 0.693855]), atol=1e-6, rtol=0)


def test_the_reference_point_is_never_negative_and_carries_no_gradient():
    logps = torch.tensor([-3.0, -4.0], requires_grad=True)
    z = kto_reference_point(logps, torch.tensor([-2.0, -2.0]))  # mean log-ratio −1.5, clamped
    assert z.item() == 0.0 and not z.requires_grad


def test_the_loss_falls_as_liked_answers_rise_and_disliked_ones_fall():
    ref = torch.tensor([-5.0, -5.0])
    labels = torch.tensor([True, False])
    z = torch.tensor(0.0)
    at_reference = kto_loss(ref.clone(), ref, labels, z, 0.5).sum()
    moved = kto_loss(ref + torch.tensor([1.0, -1.0]), ref, labels, z, 0.5).sum()
    wrong_way = kto_loss(ref + torch.tensor([-1.0, 1.0]), ref, labels, z, 0.5).sum()
    assert moved < at_reference < wrong_way
    # With r = 0 and z₀ = 0 each loss is λ (1 − σ(0)) = λ/2.
    assert at_reference.item() == pytest.approx(1.0)


def trl_kto_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss on these sequence log-probs: a stand-in model returns them
    as one log-prob per sequence (input ids 0: the labelled answers, 1: the mismatched ones)."""
    from trl import KTOTrainer

    batch = logps.shape[0]

    def model(input_ids, **kwargs):
        values = kl_logps if int(input_ids[0, 0]) == 1 else logps
        return types.SimpleNamespace(
            log_probs=values[:, None], entropy=torch.zeros(batch, 1), mean_logits=torch.zeros(batch, 1)
        )

    identity = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=identity),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda model, inputs: KTOTrainer._compute_kl_logps(trainer, model, inputs)
    ones = torch.ones(batch, 2, dtype=torch.long)
    inputs = {
        "label": labels.long(),
        "input_ids": ones * 0,
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": ones,
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    return float(KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.7, 1.0)])
def test_kto_matches_trls_kto_trainer_on_the_same_tensors(weights):
    pytest.importorskip("trl")
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        ref, ref_kl = -torch.rand(6, generator=generator) * 20, -torch.rand(6, generator=generator) * 20
        logps = ref + torch.randn(6, generator=generator) * 3
        kl_logps = ref_kl + torch.randn(6, generator=generator) + 0.3 * seed  # a negative mean clamps to 0
        labels = torch.tensor([True, False, True, True, False, False])
        expected = trl_kto_loss(logps, ref, labels, kl_logps, ref_kl, 0.1, *weights)
        z = kto_reference_point(kl_logps, ref_kl)
        ours = kto_loss(logps, ref, labels, z, 0.1, *weights).mean()
        assert ours.item() == pytest.approx(expected, rel=1e-5), seed
