"""Reward sources (functions, classifiers), their failure modes, answer parsing, and rollout masks."""

import pytest
import torch

from rlhfkit.config import RewardSourceSettings, RolloutSettings
from rlhfkit.errors import UserError
from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve
from rlhfkit.passes import response_logprobs
from rlhfkit.reward_functions import final_number, numeric_answer
from rlhfkit.rewards import (
    RewardError,
    RewardModelScorer,
    RewardSource,
    combine_ensemble,
    load_reward_function,
    score_completions,
)
from rlhfkit.sampling import encode_prompts, response_mask_from, sample_rollout

PROMPTS = [({"role": "user", "content": "What is 2 + 2?"},), ({"role": "user", "content": "What is 3 + 4?"},)]


@pytest.mark.parametrize(
    "text, number",
    [
        ("The answer is 14.", 14.0),
        ("7 + 5 = 12", 12.0),
        ("First 23 and 45. Adding them gives 68", 68.0),
        ("#### 1,234", 1234.0),
        ("so it costs $36.50 in total", 36.5),
        ("\\boxed{7} and then 9", 7.0),
        ("The answer is: **-3**, not 5", -3.0),
        ("no digits here", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_numeric_answer():
    completions = ["The answer is 4.", "3 + 4 = 8", "Janet sells 9 eggs.\n#### 18"]
    assert numeric_answer(["a", "b", "c"], completions, answer=[4, 7.0, "#### 18"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        numeric_answer(["a"], ["4"])


def write_module(tmp_path, source):
    path = tmp_path / "my_rewards.py"
    path.write_text(source)
    return path


def test_reward_function_from_a_file_gets_prompts_completions_and_columns(tmp_path):
    path = write_module(
        tmp_path,
        (
            "def score(prompts, completions, answer, **columns):\n"
            "    return [float(p.endswith('?')) + float(c == str(a)) for p, c, a in zip(prompts, completions, answer)]\n"
        ),
    )
    source = RewardSource(RewardSourceSettings(function=f"{path}:score"))
    scored = score_completions(source, PROMPTS, ["4", "8"], [{"answer": 4}, {"answer": 7}], torch.tensor([True, True]))
    assert scored.scores.tolist() == [2.0, 1.0] and scored.valid.all() and scored.skipped == 0


def test_reward_function_from_a_module():
    function = load_reward_function("rlhfkit.reward_functions:numeric_answer")
    assert function is numeric_answer


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "expected module:function"),
        ("missing_file.py:fn", "does not exist"),
        ("rlhfkit.reward_functions:nope", "has no function 'nope'"),
        ("rlhfkit.not_a_module:fn", "cannot import"),
    ],
)
def test_bad_reward_function_specs_are_named(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_function(spec)


def test_a_reward_file_that_fails_to_import_is_named(tmp_path):
    path = write_module(tmp_path, "raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="importing .* failed: RuntimeError: boom"):
        load_reward_function(f"{path}:score")


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [float('nan'), 1.0]", r"returned nan for sample 0 \(prompt 'What is 2 \+ 2\?'"),
        ("return [1.0, float('inf')]", "returned inf for sample 1"),
        ("return [1e308, 1.0]", r"returned 1e\+308 \(beyond float32's range\) for sample 0"),
        ("return [1.0, 'good']", "returned 'good' for sample 1"),
        ("return [1.0]", "must return one float per completion"),
        ("raise KeyError('answer')", "raised KeyError"),
    ],
)
def test_invalid_rewards_stop_the_step_naming_function_and_sample(tmp_path, body, message):
    path = write_module(tmp_path, f"def score(prompts, completions, **columns):\n    {body}\n")
    source = RewardSource(RewardSourceSettings(function=f"{path}:score"))
    with pytest.raises(RewardError, match=message) as error:
        score_completions(source, PROMPTS, ["4", "8"], [{}, {}], torch.tensor([True, True]))
    assert "my_rewards.py:score" in str(error.value)


def test_invalid_rewards_can_be_skipped_and_counted(tmp_path):
    path = write_module(tmp_path, "def score(prompts, completions, **columns):\n    return [float('nan'), 2.0]\n")
    source = RewardSource(RewardSourceSettings(function=f"{path}:score", on_invalid="skip"))
    scored = score_completions(source, PROMPTS, ["4", "8"], [{}, {}], torch.tensor([True, True]))
    assert scored.valid.tolist() == [False, True] and scored.skipped == 1
    assert scored.scores.tolist() == [0.0, 2.0] and scored.raw_mean == 2.0
    huge = tmp_path / "huge.py"
    huge.write_text("def score(prompts, completions, **columns):\n    return [2.0, -1e300]\n")
    source = RewardSource(RewardSourceSettings(function=f"{huge}:score", on_invalid="skip"))
    scored = score_completions(source, PROMPTS, ["4", "8"], [{}, {}], torch.tensor([True, True]))
    assert scored.valid.tolist() == [True, False] and scored.raw_mean == 2.0


def test_missing_eos_penalty(tmp_path):
    path = write_module(tmp_path, "def score(prompts, completions, **columns):\n    return [1.0, 1.0]\n")
    source = RewardSource(RewardSourceSettings(function=f"{path}:score", missing_eos_penalty=0.5))
    scored = score_completions(source, PROMPTS, ["4", "8"], [{}, {}], torch.tensor([True, False]))
    assert scored.scores.tolist() == [1.0, 0.5]


def test_reward_settings_need_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        RewardSourceSettings()
    with pytest.raises(ValueError, match="exactly one"):
        RewardSourceSettings(function="a:b", model="x")


def test_ensemble_objectives_by_hand():
    members = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])  # 3 reward models x 2 answers
    reward, spread = combine_ensemble(members, "mean")
    assert reward.tolist() == pytest.approx([2.0, 3.0])
    assert spread.tolist() == pytest.approx([(2 / 3) ** 0.5, 2**0.5])  # variances 2/3 and 6/3
    assert combine_ensemble(members, "worst_case")[0].tolist() == [1.0, 2.0]
    assert combine_ensemble(members, "uncertainty_weighted", 0.5)[0].tolist() == pytest.approx([2 - 1 / 3, 3 - 1])


def test_an_ensemble_scores_with_every_member_and_reports_their_disagreement(tiny_reward_model, second_reward_model):
    answers = ["4", "It is 7."]
    first = RewardModelScorer(str(tiny_reward_model)).score(PROMPTS, answers)
    second = RewardModelScorer(str(second_reward_model)).score(PROMPTS, answers)
    settings = RewardSourceSettings(
        model=str(tiny_reward_model),
        ensemble=[str(second_reward_model)],
        ensemble_objective="uncertainty_weighted",
        uncertainty_penalty=0.5,
    )
    scored = score_completions(RewardSource(settings), PROMPTS, answers, [{}, {}], torch.tensor([True, True]))
    half_gaps = [abs(a - b) / 2 for a, b in zip(first, second)]  # two members: variance = (half their gap)²
    means = [(a + b) / 2 for a, b in zip(first, second)]
    assert scored.scores.tolist() == pytest.approx([m - 0.5 * g**2 for m, g in zip(means, half_gaps)], abs=1e-5)
    assert scored.disagreement.tolist() == pytest.approx(half_gaps, abs=1e-5) and min(half_gaps) > 0
    alone = score_completions(
        RewardSource(RewardSourceSettings(model=str(tiny_reward_model))), PROMPTS, answers, [{}, {}], torch.ones(2) > 0
    )
    assert alone.disagreement is None and alone.scores.tolist() == pytest.approx(first, abs=1e-6)


def test_ensemble_settings_are_checked(tiny_reward_model):
    with pytest.raises(ValueError, match="ensemble: its reward models score beside `model`"):
        RewardSourceSettings(function="a:b", ensemble=[str(tiny_reward_model)])
    with pytest.raises(ValueError, match="'worst_case' needs reward models listed in ensemble"):
        RewardSourceSettings(model=str(tiny_reward_model), ensemble_objective="worst_case")
    with pytest.raises(ValueError, match="ensemble.0(.|\\n)*model path does not exist: ./runs/nope"):
        RewardSourceSettings(model=str(tiny_reward_model), ensemble=["./runs/nope"])
    with pytest.raises(ValueError, match="uncertainty_penalty"):
        RewardSourceSettings(model=str(tiny_reward_model), ensemble=[str(tiny_reward_model)], uncertainty_penalty=-1)


@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory, tiny_model):
    """A tiny two-label classifier (NEGATIVE/POSITIVE) on the tiny model's backbone."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    directory = tmp_path_factory.mktemp("classifier")
    config = AutoConfig.from_pretrained(
        tiny_model, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory)
    return directory


def test_a_classifier_label_as_reward(sentiment_classifier):
    answers = ["The sun is a star.", "Sound is a wave."]
    prompts = ["Tell me something.", "And another?"]
    logits = RewardModelScorer(str(sentiment_classifier), label="POSITIVE").score(prompts, answers)
    probability = RewardModelScorer(str(sentiment_classifier), label="positive", output="probability").score(
        prompts, answers
    )
    negative = RewardModelScorer(str(sentiment_classifier), label=0, output="probability").score(prompts, answers)
    assert all(0 < p < 1 for p in probability)
    assert [p + n for p, n in zip(probability, negative)] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert logits != probability
    with pytest.raises(UserError, match="NEUTRAL"):
        RewardModelScorer(str(sentiment_classifier), label="NEUTRAL")


def test_response_mask_includes_the_first_eos_even_when_pad_is_eos():
    eos = 9
    responses = torch.tensor([[5, 6, eos, eos, eos], [5, 6, 7, 8, 4], [eos, eos, eos, eos, eos]])
    mask, ended = response_mask_from(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_prompts_are_left_padded_and_keep_their_end(tiny_model):
    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    ids, mask = encode_prompts(tokenizer, ["Why is the sky blue?", "Why?"], max_length=4)
    assert ids.shape == (2, 4) and mask[0].tolist() == [1, 1, 1, 1] and mask[1, 0] == 0
    full = tokenizer("Why is the sky blue?", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == full[-4:]


def test_rollout_log_probs_match_the_sampling_distribution(tiny_model, monkeypatch):
    import rlhfkit.passes as rollout_module

    """The behaviour log-probs equal log softmax(logits / T) of a plain forward, token by token."""
    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    settings = RolloutSettings(max_new_tokens=5, temperature=0.7, batch_size=3)
    torch.manual_seed(0)
    rollout = sample_rollout(model, tokenizer, ["Why is the sky blue?", "What is a magnet?"], settings, 2, 64)
    assert rollout.size == 4 and rollout.prompt_index.tolist() == [0, 0, 1, 1]
    rollout.response_mask[0, 2:] = 0  # as if row 0 had stopped after 2 tokens: its padding must not count
    logprobs, entropy = response_logprobs(model, rollout, 0.7, with_entropy=True)
    for row in range(rollout.size):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        response = rollout.response_ids[row][rollout.response_mask[row].bool()]
        sequence = torch.cat([prompt, response])[None]
        with torch.no_grad():
            logits = model(sequence).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, response[:, None]).squeeze(1)
        assert torch.allclose(logprobs[row, : len(response)], expected, atol=1e-4)
        assert (logprobs[row, len(response) :] == 0).all()
    assert (entropy[rollout.response_mask.bool()] > 0).all()
    # the padded-rows path (models whose attention ignores position ids) gives the same numbers
    monkeypatch.setattr(rollout_module, "packs_by_position_ids", lambda decoder: False)
    padded, _ = response_logprobs(model, rollout, 0.7)
    torch.testing.assert_close(padded, logprobs, rtol=1e-4, atol=1e-5)


def test_samples_of_one_prompt_share_it_in_the_packed_pass_with_the_same_values_and_gradients(tiny_model, monkeypatch):
    """Log-probs, entropies and gradients with each prompt run once per group equal those with
    the prompt repeated for every sample (the layout before sharing)."""
    import rlhfkit.passes as rollout_module

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    settings = RolloutSettings(max_new_tokens=6, temperature=0.7, batch_size=5)
    torch.manual_seed(0)
    rollout = sample_rollout(model, tokenizer, ["Why is the sky blue?", "What is a magnet?", "Hi"], settings, 3, 64)
    rollout.response_mask[4, 1:] = 0  # a group with a one-token answer
    results = {}
    for share in (True, False):
        monkeypatch.setattr(rollout_module, "shares_prompts", lambda decoder, share=share: share)
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, rollout, 0.7, with_entropy=True)
        (logprobs * torch.linspace(0.5, 1.5, logprobs.numel()).view_as(logprobs)).sum().backward()
        results[share] = logprobs.detach(), entropy, [p.grad.clone() for p in model.parameters()]
    _, _, _, layout = rollout_module._packed_sequence_inputs(rollout, share_prompts=True)
    assert [len(responses) for _, _, responses in layout] == [3, 3, 3]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-5)
    for shared_grad, separate_grad in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(shared_grad, separate_grad, rtol=1e-3, atol=1e-5)


def test_samples_of_one_prompt_start_from_one_prefill_and_draw_what_a_full_prefill_draws(tiny_model, monkeypatch):
    import rlhfkit.sampling as rollout_module

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    settings = RolloutSettings(max_new_tokens=6, temperature=1.0, batch_size=5)  # batches cut through groups
    prompts = ["Why is the sky blue?", "What is a magnet?", "Hi", "Tell me a story about a fox"]
    built = []
    real = rollout_module.shared_prompt_cache
    monkeypatch.setattr(rollout_module, "shared_prompt_cache", lambda *args: built.append(real(*args)) or built[-1])
    shared = sample_rollout(model, tokenizer, prompts, settings, 3, 64, seeds=list(range(12)))
    assert len(built) == 3 and all(cache is not None for cache in built)
    monkeypatch.setattr(rollout_module, "shared_prompt_cache", lambda *args: None)
    full = sample_rollout(model, tokenizer, prompts, settings, 3, 64, seeds=list(range(12)))
    assert torch.equal(shared.response_ids, full.response_ids) and shared.completions == full.completions
    ids, mask = encode_prompts(tokenizer, prompts[:2], 64)
    assert real(model, ids, mask, torch.arange(2)) is None  # one sample per prompt: nothing to share


def test_a_reward_model_scores_packed_answers_sharing_their_prompt_as_padded_rows_alone(tiny_model, tmp_path):
    from rlhfkit.models import load_reward_model

    source = resolve(str(tiny_model))
    model = load_reward_model(source, ModelSettings(), torch.float32, num_labels=1)
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(source).save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), max_length=64)
    prompts = ["Why is the sky blue?"] * 3 + ["What is 2 + 2?"] * 2 + ["Hi"]
    answers = [
        "Because of scattering.",
        "Because of the sun.",
        "No idea",
        "The answer is 4",
        "The answer is 5",
        "Hello!",
    ]
    packed = scorer.score(prompts, answers)
    rows = [scorer._row(p, a) for p, a in zip(prompts, answers)]
    several_packs = scorer._score_packed(prompts, rows, pack_tokens=30)  # a forward every few groups
    assert scorer.packs
    scorer.packs = False
    padded = scorer.score(prompts, answers)  # right-padded rows of 8, as for models without the packed attention
    assert packed == pytest.approx(padded, abs=1e-4) and several_packs == pytest.approx(padded, abs=1e-4)
    assert len(set(padded)) == len(padded)


def test_bad_prompt_rows_are_named(tmp_path):
    from conftest import write_jsonl
    from rlhfkit.data.examples import prompt_examples
    from rlhfkit.data.loading import read_rows
    from rlhfkit.errors import DataError

    missing = write_jsonl(tmp_path / "questions.jsonl", [{"question": "Why?"}])
    with pytest.raises(DataError, match=r"questions.jsonl:1: missing column: expected `prompt`.*data.columns"):
        prompt_examples(read_rows(str(missing)))
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "Why?", "answer": 1},
            {"prompt": "   "},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"prompt": 7},
        ],
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: column 'prompt' is empty"):
        prompt_examples(read_rows(str(bad)))
    kept, report = prompt_examples(read_rows(str(bad)), "skip")
    assert [e.columns for e in kept] == [{"answer": 1}] and sum(report.skipped.values()) == 3
    assert "must not end with an assistant turn" in str(
        pytest.raises(DataError, prompt_examples, read_rows(str(bad))[2:3]).value
    )


def test_row_seeded_sampler_draws_from_the_processed_distribution():
    from rlhfkit.sampling import RowSeededSampler, row_seed

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    settings = RolloutSettings(temperature=0.5, top_k=3, top_p=1.0)
    counts = torch.zeros(5)
    for seed in range(4000):
        scores = RowSeededSampler([row_seed(7, seed)], settings)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        assert scores.isfinite().sum() == 1  # a one-hot row: greedy decoding takes the drawn token
        counts[scores.argmax()] += 1
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, -1)  # top-3 of logits / T
    assert counts[3:].sum() == 0  # outside the top-k: never drawn
    assert torch.allclose(counts[:3] / counts.sum(), expected, atol=0.02)


def test_unseeded_sampling_draws_row_seeds_from_torchs_generator(tiny_model):
    """Without seeds, every sampler draws as the RL rollouts do, its seeds from torch's generator:
    torch.manual_seed repeats the samples, and they are those of the seeded path."""
    from rlhfkit.sampling import generate_texts, global_seeds

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    settings = RolloutSettings(max_new_tokens=12, temperature=1.0, batch_size=4)
    prompts = ["Why is the sky blue?", "What is a magnet?"]
    torch.manual_seed(11)
    unseeded = sample_rollout(model, tokenizer, prompts, settings, 2, 64)
    torch.manual_seed(11)
    seeded = sample_rollout(model, tokenizer, prompts, settings, 2, 64, global_seeds(4))
    assert torch.equal(unseeded.response_ids, seeded.response_ids)
    torch.manual_seed(12)
    assert not torch.equal(sample_rollout(model, tokenizer, prompts, settings, 2, 64).response_ids, seeded.response_ids)
    texts = [generate_texts(model, tokenizer, prompts, 12, temperature=1.0, seed=seed) for seed in (5, 5, 6)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_seeded_completions_do_not_depend_on_their_batch(tiny_model):
    """A completion drawn with its own seed is the same alone or beside other prompts."""
    from rlhfkit.sampling import row_seed

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    settings = RolloutSettings(max_new_tokens=8, temperature=1.0, batch_size=6)
    prompts = ["Why is the sky blue?", "What is a magnet?", "How"]
    seeds = [row_seed(0, 3, index) for index in range(6)]
    together = sample_rollout(model, tokenizer, prompts, settings, 2, 64, seeds)
    apart = sample_rollout(model, tokenizer, prompts[2:], settings, 2, 64, seeds[4:])
    assert together.completions[4:] == apart.completions
    assert len(set(together.completions)) > 1
    again = sample_rollout(model, tokenizer, prompts, settings, 2, 64, seeds)
    assert again.completions == together.completions
