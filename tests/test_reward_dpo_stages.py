"""The reward-model and DPO stages on a tiny random model: they learn a simple preference."""

import json

import pytest
import torch

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.config.loading import load_config
from rlhfkit.rewards import RewardModelScorer
from rlhfkit.stages import dpo, reward


@pytest.fixture()
def preference_file(tmp_path, sft_rows):
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No idea, go away."} for r in sft_rows]
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


def train_sft_adapter(model, rows, tmp_path, steps):
    """A short SFT run through the CLI, its LoRA adapter in tmp_path/sft."""
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    settings = [
        f"model.name_or_path={model}",
        f"data.path={data}",
        f"train.max_steps={steps}",
        f"train.output_dir={tmp_path / 'sft'}",
        "generation.num_prompts=0",
        "train.trackers=[]",
    ]
    assert main(["sft", *[arg for setting in settings for arg in ("--set", setting)]]) == 0


def stage_config(stage, model, data, output_dir, *overrides):
    return load_config(
        stage,
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={data}",
            "data.eval_fraction=0.25",
            "data.max_length=96",
            f"train.output_dir={output_dir}",
            "train.trackers=[]",
            "train.batch_size=4",
            "lora.dropout=0.0",
            *overrides,
        ],
    )


def test_reward_model_learns_a_simple_preference(tiny_model, preference_file, tmp_path):
    metrics = reward.run(
        stage_config("reward", tiny_model, preference_file, tmp_path / "rm", "train.epochs=4", "train.lr=3e-3")
    )
    assert metrics["after"]["accuracy"] == 1.0
    assert metrics["after"]["margin"] > metrics["before"]["margin"] + 1.0
    assert {"reward_mean", "reward_std", "chosen_mean", "rejected_mean"} <= set(metrics["after"])
    scorer = RewardModelScorer(str(tmp_path / "rm"), max_length=96)
    good, bad = scorer.score(
        ["Why is the sky blue?"] * 2,
        ["Sunlight scatters in the air, and blue light scatters the most.", "No idea, go away."],
    )
    assert good > bad


def test_reward_model_on_mixed_sources_reports_each_sources_held_out_accuracy(
    tiny_model, preference_file, tmp_path, capsys
):
    (tmp_path / "other").mkdir()
    other = write_jsonl(
        tmp_path / "other" / "pairs.jsonl",
        [
            {"prompt": f"Count to {n}.", "chosen": " ".join(map(str, range(1, n + 1))), "rejected": "No."}
            for n in range(2, 14)
        ],
    )
    metrics = reward.run(
        stage_config("reward", tiny_model, preference_file, tmp_path / "rm", f"data.mix=[{other}]", "train.max_steps=2")
    )
    for when in ("before", "after"):
        scores = metrics[when]
        assert scores["pairs/prefs.jsonl"] == 6 and scores["pairs/other/pairs.jsonl"] == 3  # a quarter of 24 and 12
        weighted = sum(
            scores[f"accuracy/{label}"] * scores[f"pairs/{label}"] for label in ("prefs.jsonl", "other/pairs.jsonl")
        )
        assert scores["accuracy"] == pytest.approx(weighted / scores["pairs"])
    assert "other/pairs.jsonl: held-out pair accuracy" in capsys.readouterr().out


def test_binary_reward_model_on_mixed_sources_reports_each_sources_label_accuracy(tiny_model, sft_rows, tmp_path):
    def labelled(rows, bad):
        return [
            {"prompt": r["prompt"], "completion": answer, "label": liked}
            for r in rows
            for answer, liked in ((r["completion"], True), (bad, False))
        ]

    first = write_jsonl(tmp_path / "a.jsonl", labelled(sft_rows, "No idea."))
    second = write_jsonl(tmp_path / "b.jsonl", labelled(sft_rows, "Go away."))
    metrics = reward.run(
        stage_config(
            "reward",
            tiny_model,
            first,
            tmp_path / "rm",
            f"data.mix=[{second}]",
            "train.max_steps=1",
            "eval.before=false",
        )
    )
    after = metrics["after"]
    assert after["examples/a.jsonl"] + after["examples/b.jsonl"] == after["examples"]
    assert {"label_accuracy/a.jsonl", "auc/a.jsonl", "label_accuracy/b.jsonl", "auc/b.jsonl"} <= set(after)


def test_reward_model_on_an_sft_adapter_backbone_and_score_command(
    tiny_model, preference_file, sft_rows, tmp_path, capsys
):
    train_sft_adapter(tiny_model, sft_rows, tmp_path, steps=2)
    reward.run(stage_config("reward", tmp_path / "sft", preference_file, tmp_path / "rm", "train.max_steps=2"))
    adapter = json.loads((tmp_path / "rm" / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["base_model_name_or_path"] == str(tmp_path / "sft")
    capsys.readouterr()
    assert main(["score", str(tmp_path / "rm"), "--prompt", "Why?", "--response", "Because."]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["score"], float)
    answers = write_jsonl(
        tmp_path / "answers.jsonl",
        [{"prompt": "Why?", "completion": "Because."}, {"prompt": "How?", "completion": "Slowly."}],
    )
    assert (
        main(["score", str(tmp_path / "rm"), "--data", str(answers), "--output", str(tmp_path / "scored.jsonl")]) == 0
    )
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 2
    assert main(["score", str(tmp_path / "rm"), "--prompt", "only a prompt"]) == 2


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo"])
def test_dpo_moves_chosen_log_probs_above_rejected(tiny_model, preference_file, tmp_path, loss):
    beta = "0.5" if loss == "simpo" else "0.1"
    metrics = dpo.run(
        stage_config(
            "dpo",
            tiny_model,
            preference_file,
            tmp_path / "dpo",
            f"dpo.loss={loss}",
            f"dpo.beta={beta}",
            "train.epochs=3",
            "train.lr=5e-3",
            "generation.num_prompts=0",
        )
    )
    before, after = metrics["before"], metrics["after"]
    gap = lambda m: m["logps_chosen"] - m["logps_rejected"]  # noqa: E731
    assert gap(after) > gap(before) + 1.0
    assert after["accuracy"] > 0.9 and after["loss"] < before["loss"]
    if loss == "orpo":  # its SFT term raises the chosen answers' likelihood itself
        assert after["logps_chosen"] > before["logps_chosen"]
    if loss in ("sigmoid", "ipo"):
        assert before["accuracy"] == 0.5 and before["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference


def test_precomputed_reference_equals_live_reference_and_full_fine_tuning_works(tiny_model, preference_file, tmp_path):
    common = ["train.max_steps=3", "train.lr=5e-3", "generation.num_prompts=0", "eval.before=false"]
    live = dpo.run(stage_config("dpo", tiny_model, preference_file, tmp_path / "live", *common))
    table = dpo.run(
        stage_config("dpo", tiny_model, preference_file, tmp_path / "table", "dpo.precompute_reference=true", *common)
    )
    assert table["after"]["loss"] == pytest.approx(live["after"]["loss"], rel=1e-4)
    full = dpo.run(stage_config("dpo", tiny_model, preference_file, tmp_path / "full", "lora.enabled=false", *common))
    assert full["after"]["accuracy"] > 0.5
    assert (tmp_path / "full" / "final" / "model.safetensors").exists()


def test_dpo_scores_generated_answers_with_a_reward_model(tiny_model, preference_file, tmp_path):
    reward.run(stage_config("reward", tiny_model, preference_file, tmp_path / "rm", "train.max_steps=2"))
    metrics = dpo.run(
        stage_config(
            "dpo",
            tiny_model,
            preference_file,
            tmp_path / "dpo",
            "train.max_steps=2",
            f"eval.reward_model={tmp_path / 'rm'}",
            "generation.num_prompts=2",
            "generation.max_new_tokens=4",
            "generation.extra_prompts=[Explain quantum computing to a 10-year-old.]",
        )
    )
    assert isinstance(metrics["before"]["reward_model_score"], float) and isinstance(
        metrics["after"]["reward_model_score"], float
    )
    assert "Explain quantum computing" in (tmp_path / "dpo" / "samples.md").read_text()
    assert torch.isfinite(torch.tensor(metrics["after"]["reward_model_score"]))


def test_merging_a_reward_run_keeps_its_trained_score_head(tiny_model, preference_file, tmp_path, capsys):
    reward.run(
        stage_config("reward", tiny_model, preference_file, tmp_path / "rm", "train.max_steps=3", "train.lr=3e-3")
    )
    assert main(["merge", str(tmp_path / "rm"), str(tmp_path / "merged")]) == 0
    prompts, answers = ["Why is the sky blue?"] * 2, ["Sunlight scatters in the air.", "No idea, go away."]
    from_run = RewardModelScorer(str(tmp_path / "rm"), max_length=96).score(prompts, answers)
    merged_once = RewardModelScorer(str(tmp_path / "merged"), max_length=96).score(prompts, answers)
    merged_again = RewardModelScorer(str(tmp_path / "merged"), max_length=96).score(prompts, answers)
    assert merged_once == merged_again
    assert merged_once == pytest.approx(from_run, abs=1e-4)


def test_scoring_with_a_model_that_has_no_trained_score_head_is_refused(tiny_model, sft_rows, tmp_path, capsys):
    assert main(["score", str(tiny_model), "--prompt", "Why?", "--response", "Because."]) == 2
    assert "not a reward model" in capsys.readouterr().err
    train_sft_adapter(tiny_model, sft_rows, tmp_path, steps=1)
    assert main(["score", str(tmp_path / "sft"), "--prompt", "Why?", "--response", "Because."]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_score_never_writes_over_its_data(tiny_model, preference_file, tmp_path, capsys):
    reward.run(stage_config("reward", tiny_model, preference_file, tmp_path / "rm", "train.max_steps=1"))
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "Why?", "completion": "Because."}])
    before = answers.read_text()
    assert main(["score", str(tmp_path / "rm"), "--data", str(answers), "--output", str(answers)]) == 2
    assert main(["score", str(tmp_path / "rm"), "--data", str(answers), "--output", str(tmp_path)]) == 2
    assert answers.read_text() == before


@pytest.fixture()
def feedback_file(tmp_path, sft_rows):
    """Good answers labelled 👍 and a curt one 👎, two to one, with ratings on some rows."""
    rows = []
    for index, row in enumerate(sft_rows):
        rows.append({"prompt": row["prompt"], "completion": row["completion"], "label": True})
        if index % 2:
            rows.append({"prompt": row["prompt"], "completion": "No idea, go away.", "label": False, "rating": 1})
    return write_jsonl(tmp_path / "feedback.jsonl", rows)


def test_kto_raises_liked_answers_above_disliked_ones(tiny_model, feedback_file, tmp_path, capsys):
    from rlhfkit.stages import kto

    metrics = kto.run(
        stage_config(
            "kto", tiny_model, feedback_file, tmp_path / "kto", "train.epochs=3", "train.lr=5e-3", "kto.beta=0.5"
        )
    )
    before, after = metrics["before"], metrics["after"]
    assert before["label_accuracy"] == 0.5 and before["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert after["label_accuracy"] > 0.9 and after["margin"] > 0.5 and after["loss"] < before["loss"]
    assert after["reward_desirable"] > 0 > after["reward_undesirable"]
    printed = capsys.readouterr().out
    assert "24 👍 and 12 👎" not in printed  # the split holds out a quarter; the note names the training counts
    assert "advises 1 to 1.33" in printed  # two to one is outside the paper's range
    log = [json.loads(line) for line in (tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/label_accuracy", "train/label_reward", "train/kl"} <= set(log[0])
    assert (tmp_path / "kto" / "samples.md").is_file()


def test_kto_and_orpo_run_from_the_command_line_on_preference_pairs_with_full_fine_tuning(
    tiny_model, preference_file, tmp_path
):
    output = tmp_path / "kto"
    settings = [
        f"model.name_or_path={tiny_model}",
        f"data.path={preference_file}",
        f"train.output_dir={output}",
        "train.max_steps=2",
        "train.trackers=[]",
        "lora.enabled=false",
        "generation.num_prompts=0",
    ]
    assert main(["kto", *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    assert (output / "final" / "model.safetensors").is_file()
    settings[2] = f"train.output_dir={tmp_path / 'orpo'}"  # ORPO, the same way, on the same pairs
    assert main(["dpo", "--set", "dpo.loss=orpo", *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    assert json.loads((tmp_path / "orpo" / "final" / "rlhfkit_model.json").read_text())["loss"] == "orpo"
    assert 0.0 <= json.loads((output / "metrics.json").read_text())["after"]["label_accuracy"] <= 1.0


def test_kto_refuses_feedback_of_one_kind_before_loading_a_model(tmp_path, capsys):
    rows = write_jsonl(
        tmp_path / "liked.jsonl", [{"prompt": "q", "completion": f"a{i}", "label": True} for i in range(8)]
    )
    settings = [f"data.path={rows}", "model.name_or_path=some-org/not-loaded", f"train.output_dir={tmp_path / 'kto'}"]
    code = main(["kto", *[arg for setting in settings for arg in ("--set", setting)]])
    assert code == 2
    assert "7 desirable (label true) and 0 undesirable" in capsys.readouterr().err


def test_a_reward_model_learns_from_thumbs_alone(tiny_model, feedback_file, tmp_path):
    metrics = reward.run(
        stage_config("reward", tiny_model, feedback_file, tmp_path / "rm", "train.epochs=4", "train.lr=3e-3")
    )
    before, after = metrics["before"], metrics["after"]
    assert after["auc"] == 1.0 and after["label_accuracy"] > 0.9 and after["log_loss"] < before["log_loss"]
    assert after["reward_desirable"] > 0 > after["reward_undesirable"]  # an absolute scale: the sign is the label
    assert after["examples"] == 9  # a quarter of 36 answers held out
    saved = json.loads((tmp_path / "rm" / "final" / "rlhfkit_model.json").read_text())
    assert saved["objective"] == "binary"
    log = json.loads((tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/label_accuracy", "train/label_reward"} <= set(log)
    scorer = RewardModelScorer(str(tmp_path / "rm"), max_length=96)
    good, bad = scorer.score(["Why is the sky blue?"] * 2, ["Sunlight scatters in the air.", "No idea, go away."])
    assert good > 0 > bad


def test_a_binary_reward_model_unpairs_preference_rows_and_refuses_centring(tiny_model, preference_file, tmp_path):
    metrics = reward.run(
        stage_config(
            "reward", tiny_model, preference_file, tmp_path / "rm", "loss.objective=binary", "train.max_steps=2"
        )
    )
    assert "auc" in metrics["after"] and "accuracy" not in metrics["after"]
    with pytest.raises(Exception, match="loss.center_coef centres pairwise rewards"):
        stage_config(
            "reward", tiny_model, preference_file, tmp_path / "x", "loss.objective=binary", "loss.center_coef=0.01"
        )


def test_an_encoder_reward_model_longer_than_its_positions_is_refused_naming_the_field(tmp_path, capfd):
    """MiniLM learned 512 positions: data.max_length 600 stops before any step, naming the field,
    where the model itself would fail mid-run on a tensor size; a judge asks the same of its
    max_length. The tokenizer's own warning about uncut texts stays quiet (rlhfkit cuts them)."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.config.online import RewardSourceSettings
    from rlhfkit.errors import ConfigError
    from rlhfkit.models import load_tokenizer, resolve
    from rlhfkit.rewards import RewardSource

    long_rows = [{"prompt": f"word{i} " * 300, "chosen": "Yes.", "rejected": "No."} for i in range(8)]
    data = write_jsonl(tmp_path / "long.jsonl", long_rows)
    config = stage_config(
        "reward", "all-minilm-l6-v2", data, tmp_path / "rm", "data.max_length=600", "lora.enabled=false"
    )
    with pytest.raises(ConfigError, match=r"data.max_length=600: all-minilm-l6-v2 has learned positions for 512"):
        reward.run(config)
    assert "longer than the specified maximum sequence length" not in capfd.readouterr().err

    judge_dir = tmp_path / "minilm-judge"
    source = resolve("all-minilm-l6-v2")
    AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=1).save_pretrained(judge_dir)
    load_tokenizer(source).save_pretrained(judge_dir)
    with pytest.raises(
        ConfigError, match=r"eval.judges.gold.max_length=513: .* set eval.judges.gold.max_length to 512"
    ):
        RewardSource(RewardSourceSettings(model=str(judge_dir), max_length=513), where="eval.judges.gold")
    assert RewardSource(RewardSourceSettings(model=str(judge_dir), max_length=512)).members
