"""PPO, GRPO and TRPO on a tiny random model: rewarding one token makes it more frequent in sampled answers."""

import json

import pytest
import torch

from conftest import QUESTIONS, write_jsonl
from rlhfkit.cli import main
from rlhfkit.config.loading import load_config
from rlhfkit.data.formatting import render_prompt
from rlhfkit.engine.distributed import cpu_has_bf16_matmul
from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve
from rlhfkit.stages import grpo, online_dpo, ppo, trpo

TARGET = "Why"

REWARD_SOURCE = f'''
def target_count(prompts, completions, **columns):
    return [float(completion.count("{TARGET}")) for completion in completions]


def target_penalty(prompts, completions, **columns):
    return [-float(completion.count("{TARGET}")) for completion in completions]


def broken(prompts, completions, **columns):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def enormous(prompts, completions, **columns):
    return [1e308] + [float(len(completion)) for completion in completions[1:]]
'''


@pytest.fixture()
def prompt_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": i} for i, q in enumerate(QUESTIONS * 2)])


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_SOURCE)
    return path


@pytest.fixture(scope="module")
def target_liking_model(tiny_model, tmp_path_factory):
    """The tiny model, nudged so that TARGET starts as the first answer token with p ≈ 4%.

    A random 400-token model says TARGET with p ≈ 1/400: a batch of 32 six-token completions
    holds about one, so whether RL finds the signal was a matter of the seed (about 2 runs in 3
    passed). With the target's logit raised by 3 at answer positions, most batches have reward
    variance, and the test measures the algorithms: across seeds 0-2 every algorithm raised the
    held-out reward from 0.05 to 0.22-0.31 (paired z 3.2-3.9); the grpo-stage variants below
    (RLOO, REINFORCE++, GSPO, DAPO, CISPO) raised it from 0.047 to 0.25-0.31 at seeds 0-2.
    """
    import shutil

    directory = tmp_path_factory.mktemp("target-liking")
    for item in tiny_model.iterdir():
        shutil.copy(item, directory / item.name)
    tokenizer = load_tokenizer(resolve(str(directory)))
    model = load_causal_lm(resolve(str(directory)), ModelSettings(), torch.float32).eval()
    (target_id,) = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    states = []
    for question in QUESTIONS:
        text = render_prompt(tokenizer, [{"role": "user", "content": question}], "auto")
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            states.append(model.model(ids).last_hidden_state[0, -1])
    direction = torch.stack(states).mean(dim=0)
    with torch.no_grad():  # tied embeddings: the head row of TARGET is its embedding row
        model.get_output_embeddings().weight[target_id] += 3.0 * direction / direction.square().sum()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def rl_config(stage, model, prompts, reward, output_dir, *overrides):
    return load_config(
        stage,
        None,
        [
            f"model.name_or_path={model}",
            f"data.path={prompts}",
            "data.eval_fraction=0.25",
            f"reward.function={reward}:target_count",
            f"train.output_dir={output_dir}",
            "train.trackers=[]",
            "train.batch_size=16",
            "lora.dropout=0.0",
            "train.lr=2e-2",
            "rollout.prompts_per_step=8",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=6",
            "rollout.temperature=1.0",
            "eval.num_prompts=4",
            "eval.samples_per_prompt=16",
            *overrides,
        ],
    )


def metrics_steps(overrides):
    return next(int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps="))


@pytest.mark.parametrize(
    "stage, module, extra",
    [
        # PPO's critic starts untrained, so its advantages are noisy at first: more steps, smaller ones.
        (
            "ppo",
            ppo,
            ["train.max_steps=16", "ppo.kl_coef=0.01", "ppo.epochs=4", "ppo.minibatch_size=16", "train.lr=3e-3"],
        ),
        (
            "ppo",
            ppo,
            [
                "train.max_steps=16",
                "ppo.kl_coef=0.01",
                "ppo.epochs=4",
                "ppo.minibatch_size=16",
                "train.lr=3e-3",
                "ppo.critic=head",
            ],
        ),
        ("grpo", grpo, ["train.max_steps=12", "grpo.beta=0.0"]),
        # the rest of the critic-free family, as options of the grpo stage (docs: RL algorithms)
        (
            "grpo",
            grpo,
            ["train.max_steps=12", "grpo.advantage=rloo", "grpo.kl_penalty=reward", "grpo.beta=0.01"],
        ),
        (
            "grpo",
            grpo,
            ["train.max_steps=12", "grpo.advantage=reinforce_pp", "grpo.kl_penalty=reward", "grpo.beta=0.01"],
        ),
        ("grpo", grpo, ["train.max_steps=12", "grpo.advantage=reinforce_pp_group", "grpo.beta=0.0"]),
        (
            "grpo",
            grpo,
            [
                *("train.max_steps=12", "grpo.importance_level=sequence", "grpo.loss_aggregation=sequence"),
                *("grpo.epochs=2", "train.lr=1e-2", "grpo.beta=0.0"),  # a second pass: ratios move off 1
            ],
        ),
        (
            "grpo",
            grpo,
            [
                *("train.max_steps=12", "grpo.clip_high=0.28", "grpo.dynamic_sampling=true", "grpo.beta=0.0"),
                *("grpo.epochs=2", "train.lr=1e-2", "grpo.dynamic_sampling_rounds=2"),
            ],
        ),
        (
            "grpo",
            grpo,
            ["train.max_steps=12", "grpo.objective=cispo", "grpo.beta=0.0", "grpo.epochs=2", "train.lr=1e-2"],
        ),
        # rollouts from the int8 copy, corrected by truncated importance sampling
        (
            "grpo",
            grpo,
            ["train.max_steps=12", "grpo.beta=0.0", "rollout.engine=int8", "rollout.correction=tis"],
        ),
        # rollouts from the bf16 copy (needs the CPU's bf16 instructions)
        pytest.param(
            "grpo",
            grpo,
            ["train.max_steps=12", "grpo.beta=0.0", "rollout.engine=bf16"],
            marks=pytest.mark.skipif(not cpu_has_bf16_matmul(), reason="this CPU has no bf16 matrix instructions"),
        ),
        # every pass of the update in bf16 products (float32 weights, head and losses)
        pytest.param(
            "grpo",
            grpo,
            ["train.max_steps=12", "train.mixed_precision=bf16"],
            marks=pytest.mark.skipif(not cpu_has_bf16_matmul(), reason="this CPU has no bf16 matrix instructions"),
        ),
        ("trpo", trpo, ["train.max_steps=12", "trpo.max_kl=0.05"]),
        # online DPO: 0.047 -> 0.27-0.31 at seeds 0-2 with lr 1e-2; at 2e-2 one seed in three collapsed to 0
        ("online_dpo", online_dpo, ["train.max_steps=12", "train.lr=1e-2"]),
    ],
    ids=[
        "ppo-model",
        "ppo-head",
        "grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_group",
        "gspo",
        "dapo",
        "cispo",
        "grpo-int8-tis",
        "grpo-bf16",
        "grpo-mixed-bf16",
        "trpo",
        "online_dpo",
    ],
)
def test_rewarding_one_token_makes_it_more_likely(
    target_liking_model, prompt_file, reward_file, tmp_path, stage, module, extra
):
    out = tmp_path / stage
    metrics = module.run(rl_config(stage, target_liking_model, prompt_file, reward_file, out, *extra))
    # The held-out reward is how often TARGET appears in sampled answers (same prompts and seeds
    # before and after): it rises several-fold, far beyond the paired standard error.
    before, after = metrics["before"]["reward_mean"], metrics["after"]["reward_mean"]
    assert after > 3 * before > 0, (stage, before, after)
    assert metrics["after"]["reward_gain"] > 2.5 * metrics["after"]["reward_gain_stderr"]
    assert metrics["after"]["kl"] > 0 and metrics["before"]["kl"] == pytest.approx(0.0, abs=1e-5)
    gains = [a - b for a, b in zip(metrics["after"]["sample_rewards"], metrics["before"]["sample_rewards"])]
    assert metrics["after"]["reward_gain"] == pytest.approx(sum(gains) / len(gains))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == metrics_steps(extra) and {
        "train/reward_mean",
        "train/kl",
        "train/entropy",
        "train/length",
        "train/time_generation_s",
    } <= set(log[0])
    assert (out / "final" / "adapter_config.json").exists() and (out / "samples.md").exists()
    if any(setting.startswith("rollout.engine=") for setting in extra):  # the copy's distance from the
        # trainer (a k1 estimate: either sign), and the share of tokens the correction truncated
        assert 0 < abs(log[0]["train/sampler_kl"]) < 0.05
        assert 0 <= log[0].get("train/correction_fraction", 0) < 0.05
    if stage == "ppo":
        assert any((out / "critic" / name).exists() for name in ("adapter_config.json", "value_head.safetensors"))


def test_held_out_evaluations_sample_the_policy_whatever_the_rollout_engine(
    tiny_model, prompt_file, reward_file, tmp_path
):
    common = ("train.max_steps=1", "grpo.beta=0.0", "eval.num_prompts=4", "eval.samples_per_prompt=4")
    plain = grpo.run(rl_config("grpo", tiny_model, prompt_file, reward_file, tmp_path / "hf", *common))
    int8 = grpo.run(
        rl_config("grpo", tiny_model, prompt_file, reward_file, tmp_path / "int8", *common, "rollout.engine=int8")
    )
    assert "sampler_kl" not in int8["before"] and "sampler_kl" not in int8["after"]  # no copy answered them
    assert int8["before"]["answers"] == plain["before"]["answers"]
    assert int8["before"]["sample_rewards"] == plain["before"]["sample_rewards"]
    log = json.loads((tmp_path / "int8" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train/sampler_kl" in log and "train/sampler_kl" not in json.loads(
        (tmp_path / "hf" / "metrics.jsonl").read_text().splitlines()[0]
    )


@pytest.mark.parametrize(
    "extra",
    [
        # DAPO's refill rounds draw from seeds of (run, step, round, process): the same after a resume
        ["grpo.clip_high=0.28", "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_rounds=2", "grpo.beta=0.0"],
        ["grpo.advantage=reinforce_pp", "grpo.kl_penalty=reward", "grpo.beta=0.01"],
        # the int8 copy is rebuilt from the resumed policy
        ["rollout.engine=int8", "rollout.correction=tis", "grpo.importance_level=sequence", "grpo.epochs=2"],
    ],
    ids=["dapo", "reinforce_pp", "int8-tis-gspo"],
)
def test_an_interrupted_grpo_family_run_resumes_to_the_same_policy(
    tiny_model, prompt_file, reward_file, tmp_path, extra
):
    import shutil

    from safetensors.torch import load_file

    overrides = ["train.max_steps=4", "train.save_every=2", "train.save_limit=5", "eval.num_prompts=0", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo.run(rl_config("grpo", tiny_model, prompt_file, reward_file, straight, *overrides))
    shutil.copytree(straight, resumed)  # "killed" after its step-2 checkpoint
    for path in ["checkpoints/step-000004", "final"]:
        shutil.rmtree(resumed / path)
    (resumed / "run.json").write_text(json.dumps({"stage": "grpo", "status": "running"}))
    grpo.run(rl_config("grpo", tiny_model, prompt_file, reward_file, resumed, *overrides), resume=True)
    a, b = (load_file(str(run / "final/adapter_model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [
        [json.loads(line)["train/reward_mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (straight, resumed)
    ]
    assert logged[0] == pytest.approx(logged[1]) and len(logged[0]) == 4


def test_an_interrupted_ppo_run_resumes_to_the_same_policy_critic_and_kl_coefficient(
    tiny_model, prompt_file, reward_file, tmp_path
):
    import shutil

    from safetensors.torch import load_file

    overrides = [
        "train.max_steps=4",
        "train.save_every=2",
        "train.save_limit=5",
        "ppo.target_kl=0.5",
        "ppo.kl_horizon=100",
    ]
    straight = tmp_path / "straight"
    ppo.run(rl_config("ppo", tiny_model, prompt_file, reward_file, straight, *overrides))
    # The same run, "killed" after its step-2 checkpoint: later checkpoints and outputs removed.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for path in ["checkpoints/step-000004", "final", "critic"]:
        shutil.rmtree(resumed / path)
    (resumed / "run.json").write_text(json.dumps({"stage": "ppo", "status": "running"}))
    ppo.run(rl_config("ppo", tiny_model, prompt_file, reward_file, resumed, *overrides), resume=True)
    for part in [
        "final/adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "checkpoints/step-000004/trainable.safetensors",
    ]:
        a, b = load_file(str(straight / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part
    state = lambda run: json.loads((run / "checkpoints/step-000004/state.json").read_text())["extra"]  # noqa: E731
    assert state(straight)["kl_coef"] == pytest.approx(state(resumed)["kl_coef"]) and state(straight)["kl_coef"] != 0.05
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_cli_rl_errors_are_one_line_and_early(tiny_model, prompt_file, reward_file, tmp_path, capsys):
    base = [
        "--set",
        f"model.name_or_path={tiny_model}",
        "--set",
        f"data.path={prompt_file}",
        "--set",
        "train.trackers=[]",
        "--set",
        "rollout.max_new_tokens=4",
        "--set",
        "train.max_steps=1",
        "--set",
        "eval.num_prompts=2",
    ]
    assert (
        main(["grpo", *base, "--set", "reward.function=nowhere.py:fn", "--set", f"train.output_dir={tmp_path / 'a'}"])
        == 2
    )
    assert "reward.function 'nowhere.py:fn': file nowhere.py does not exist" in capsys.readouterr().err
    assert (
        main(["grpo", *base, "--set", "rollout.samples_per_prompt=1", "--set", f"train.output_dir={tmp_path / 'b'}"])
        == 2
    )
    assert "samples_per_prompt must be at least 2" in capsys.readouterr().err
    assert (
        main(
            [
                "ppo",
                *base,
                "--set",
                f"reward.function={reward_file}:broken",
                "--set",
                f"train.output_dir={tmp_path / 'c'}",
                "--set",
                "eval.before=false",  # the error comes while the progress bar is drawn
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "my_rewards.py:broken returned nan for sample 0" in err and "Traceback" not in err
    assert "\nerror: reward" in err and "it/s]error" not in err  # on a line of its own, not the bar's
    assert main(["trpo", "--print-config", "--set", "trpo.max_kl=0.02"]) == 0
    assert "max_kl: 0.02" in capsys.readouterr().out


def strict_json(text: str):
    """json.loads that refuses the NaN and Infinity Python's json module writes and accepts."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_rewards_beyond_float32_follow_on_invalid_and_every_json_file_stays_valid(
    tiny_model, prompt_file, reward_file, tmp_path, capsys
):
    config = rl_config(
        "grpo", tiny_model, prompt_file, reward_file, tmp_path / "stop", "train.max_steps=1", "eval.num_prompts=2"
    )
    config.reward.function = f"{reward_file}:enormous"
    with pytest.raises(Exception, match=r"returned 1e\+308 \(beyond float32's range\) for sample 0"):
        grpo.run(config)
    # skipped: left out of the update and counted; the statistics of the others are numbers
    run = tmp_path / "skip"
    config = rl_config(
        "grpo",
        tiny_model,
        prompt_file,
        reward_file,
        run,
        "train.max_steps=2",
        "eval.num_prompts=2",
        "reward.on_invalid=skip",
    )
    config.reward.function = f"{reward_file}:enormous"
    grpo.run(config)
    records = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(record["train/skipped_samples"] == 1.0 for record in records)
    assert all(0 < record["train/reward_mean"] < 1e6 for record in records)
    for path in run.rglob("*.json*"):
        for text in [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines():
            strict_json(text)


def test_uneven_splits_over_processes_are_named(tiny_model, prompt_file, reward_file, tmp_path):
    from rlhfkit.errors import UserError
    from rlhfkit.stages.rl_launch import check_process_count

    config = rl_config("ppo", tiny_model, prompt_file, reward_file, tmp_path / "run", "ppo.minibatch_size=6")
    check_process_count(config, "ppo", 1, 6)  # one process: anything goes
    check_process_count(config, "ppo", 2, 6)  # 8 prompts, 6 completions per minibatch: both split in two
    with pytest.raises(UserError, match=r"rollout.prompts_per_step \(8\) must be a multiple of the 3 processes"):
        check_process_count(config, "ppo", 3, 6)
    with pytest.raises(UserError, match=r"ppo.minibatch_size \(6\) must be a multiple of the 4 processes"):
        check_process_count(config, "ppo", 4, 6)


@pytest.mark.parametrize("kl_check", ["batch", "fisher"])
def test_trpo_line_search_measures_the_kl_on_the_whole_batch(
    target_liking_model, prompt_file, reward_file, tmp_path, monkeypatch, kl_check
):
    """The realised KL(old ‖ new) over every response position of the batch, computed here from the
    parameters before and after each step, is the KL the line search held to δ (`kl_check: batch`).
    Measured on one Fisher sequence only (`kl_check: fisher`), it understates how far the rest of
    the batch moved (seen here: 2-40× at the same steps)."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from rlhfkit.losses.trpo import mean_categorical_kl
    from rlhfkit.models import backbone_and_head
    from rlhfkit.passes import scaled_response_hidden

    realised, checked = [], []
    natural_step = trpo.TRPO.natural_step

    def measured_step(self, rollout, targets, gradient):
        before = parameters_to_vector(self.parameters).detach().clone()
        metrics = natural_step(self, rollout, targets, gradient)
        after = parameters_to_vector(self.parameters).detach().clone()
        head = backbone_and_head(self.context.policy)[1]
        with torch.no_grad():
            vector_to_parameters(before, self.parameters)
            old = torch.log_softmax(
                scaled_response_hidden(self.context.policy, rollout, self.context.temperature) @ head.T, -1
            )
            vector_to_parameters(after, self.parameters)
            new = torch.log_softmax(
                scaled_response_hidden(self.context.policy, rollout, self.context.temperature) @ head.T, -1
            )
        realised.append(float(mean_categorical_kl(old, new, torch.ones(old.shape[0]))))
        checked.append(metrics["line_search_kl"])
        return metrics

    monkeypatch.setattr(trpo.TRPO, "natural_step", measured_step)
    max_kl = 0.05
    trpo.run(
        rl_config(
            "trpo",
            target_liking_model,
            prompt_file,
            reward_file,
            tmp_path / kl_check,
            "train.max_steps=4",
            f"trpo.max_kl={max_kl}",
            "trpo.fisher_samples=1",
            "trpo.cg_damping=0.001",
            f"trpo.kl_check={kl_check}",
            "eval.num_prompts=1",
            "eval.samples_per_prompt=2",
        )
    )
    assert len(realised) == 4 and max(realised) > 0
    if kl_check == "batch":
        assert realised == pytest.approx(checked, rel=1e-3, abs=1e-6) and max(realised) <= max_kl
    else:
        assert any(batch > 2 * fisher for batch, fisher in zip(realised, checked)), (realised, checked)


def test_a_held_out_judge_that_disagrees_shows_over_optimisation(
    target_liking_model, prompt_file, reward_file, tmp_path
):
    """The policy games a proxy (more TARGET tokens) that one held-out judge penalises and another
    shares: the held-out curves (every 4 steps) show the training reward rising, the disagreeing
    judge falling beyond its paired error — warned about, in metrics.json, the log and the report —
    and the agreeing judge rising with the proxy (no warning)."""
    from rlhfkit.report import write_report

    out = tmp_path / "grpo"
    metrics = grpo.run(
        rl_config(
            "grpo",
            target_liking_model,
            prompt_file,
            reward_file,
            out,
            *("train.max_steps=12", "grpo.beta=0.0", "eval.every=4"),
            f"eval.judges.disagrees.function={reward_file}:target_penalty",
            f"eval.judges.agrees.function={reward_file}:target_count",
        )
    )
    assert [point["step"] for point in metrics["during"]] == [4, 8]
    for side in (metrics["before"], *metrics["during"], metrics["after"]):
        assert side["judges"]["agrees"]["samples"] == side["sample_rewards"]
        assert side["judges"]["disagrees"]["mean"] == pytest.approx(-side["reward_mean"])
    (sign,) = metrics["warnings"]
    assert sign.startswith("held-out judge disagrees fell") and "from step 0 to step 12" in sign
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    judged = [record for record in log if "eval/judge/disagrees" in record]
    assert [record["step"] for record in judged] == [4, 8]
    page = write_report(tmp_path, {"grpo": out}).read_text()
    assert "Possible over-optimisation — grpo: held-out judge disagrees fell" in page
    assert "held-out judge agrees (never trained against)" in page
    assert (tmp_path / "report_files" / "grpo-held-out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The results pages' row of this run, written from its directory (run.json, config, metrics).
    from scripts.results_rows import table

    marker = json.loads((out / "run.json").read_text())
    assert marker["started"] < marker["finished"] and marker["environment"]["torch"] == torch.__version__
    written = table([out])
    before, after = metrics["before"], metrics["after"]
    assert f"{before['reward_mean']:.3f} ± {before['reward_stderr']:.3f}" in written
    assert (
        f"**{after['reward_mean']:.3f} ± {after['reward_stderr']:.3f}** (paired gain {after['reward_gain']:+.3f}"
        in written
    )
    assert (
        f"disagrees: {before['judges']['disagrees']['mean']:.3f}" in written
        and "| `target_count` | 4 × 16 |" in written
    )
    assert f"rlhfkit {marker['rlhfkit']}, torch " in written


def test_an_rl_step_against_a_reward_model_ensemble_logs_its_disagreement(
    tiny_model, tiny_reward_model, second_reward_model, prompt_file, reward_file, tmp_path
):
    ensemble = [
        "reward.function=null",
        f"reward.model={tiny_reward_model}",
        f"reward.ensemble=[{second_reward_model}]",
        "reward.ensemble_objective=worst_case",
    ]
    for name, reward in (("ensemble", ensemble), ("function", [])):
        overrides = (*reward, "train.max_steps=1", "eval.num_prompts=0")
        grpo.run(rl_config("grpo", tiny_model, prompt_file, reward_file, tmp_path / name, *overrides))
    (step,) = [json.loads(line) for line in (tmp_path / "ensemble" / "metrics.jsonl").read_text().splitlines()]
    assert step["train/reward_disagreement"] > 0  # two random score heads disagree
    assert "train/reward_disagreement" not in (tmp_path / "function" / "metrics.jsonl").read_text()


def test_judges_are_checked_before_any_model_loads(tiny_model, prompt_file, reward_file, tmp_path):
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.judges needs held-out prompts, but eval.num_prompts is 0"):
        rl_config(
            "grpo",
            tiny_model,
            prompt_file,
            reward_file,
            tmp_path / "run",
            "eval.num_prompts=0",
            f"eval.judges.gold.function={reward_file}:target_count",
        )
    with pytest.raises(ConfigError, match="eval.judges.gold: set exactly one of function and model"):
        rl_config("grpo", tiny_model, prompt_file, reward_file, tmp_path / "run", "eval.judges.gold.max_length=64")
    assert not (tmp_path / "run").exists()


def test_trpo_fisher_passes_take_the_steps_of_one_pass(target_liking_model, prompt_file, reward_file, tmp_path):
    """Running the Fisher sequences in passes of 1 (each product reruns the forward) solves the same
    system as one kept forward: the same predicted improvement, the same steps (the conjugate-gradient
    residual, ~4e-4, is rounding and differs by 2%)."""
    logs = {}
    for passes in (4, 1):
        out = tmp_path / f"passes-{passes}"
        trpo.run(
            rl_config(
                "trpo",
                target_liking_model,
                prompt_file,
                reward_file,
                out,
                "train.max_steps=2",
                "trpo.fisher_samples=4",
                f"trpo.fisher_batch_size={passes}",
                "eval.before=false",
                "eval.num_prompts=0",
            )
        )
        logs[passes] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [[record for record in logs[passes] if "train/cg_residual" in record] for passes in (4, 1)]
    assert len(steps[0]) == len(steps[1]) == 2 and all(record["train/step_fraction"] > 0 for record in steps[0])
    for kept, rerun in zip(*steps):
        for name in ("train/grad_norm", "train/expected_improvement", "train/step_fraction", "train/line_search_kl"):
            assert rerun[name] == pytest.approx(kept[name], rel=1e-3, abs=1e-7), name


@pytest.mark.parametrize(
    "launch, how", [("ACCELERATE_USE_FSDP", r"sharded \(FSDP\)"), ("ACCELERATE_USE_DEEPSPEED", "under DeepSpeed")]
)
@pytest.mark.parametrize(
    "stage, module, extra, refusal",
    [
        ("trpo", trpo, [], "trpo does not run {how}"),
        ("grpo", grpo, ["lora.enabled=false"], "grpo {how} needs LoRA"),
        ("ppo", ppo, ["rollout.engine=vllm"], "rollout.engine: vllm does not run with a policy {how}"),
    ],
)
def test_rl_stages_refuse_what_cannot_run_sharded_before_loading(
    tiny_model, prompt_file, reward_file, tmp_path, monkeypatch, stage, module, extra, refusal, launch, how
):
    from rlhfkit.errors import UserError

    monkeypatch.setenv(launch, "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    refusal = refusal.format(how=how)
    config = rl_config(stage, tiny_model, prompt_file, reward_file, tmp_path / "run", "train.max_steps=1", *extra)
    with pytest.raises(UserError, match=refusal):
        module.run(config)
    assert not (tmp_path / "run").exists()


def _sampled_rollout(model, tokenizer):
    from rlhfkit.config import RolloutSettings
    from rlhfkit.sampling import sample_rollout

    settings = RolloutSettings(max_new_tokens=5, temperature=0.7)
    rollout = sample_rollout(
        model, tokenizer, ["Why is the sky blue?", "What is a magnet?"], settings, 2, 64, seeds=[1, 2, 3, 4]
    )
    rollout.response_mask[0, 2:] = 0  # as if row 0 had stopped after 2 tokens: its padding reads 0
    return rollout


def test_trpo_line_search_reads_the_sampled_tokens_log_probs_from_the_full_distributions(tiny_model):
    """Each line-search try takes the surrogate's log-probs from the distributions it computes for
    the KL (one forward per try): they must be the rollout log-probs of the sampled tokens."""
    from rlhfkit.losses.trpo import categorical_kl_from_states
    from rlhfkit.models import backbone_and_head
    from rlhfkit.passes import at_response_positions, response_logprobs, scaled_response_hidden

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    rollout = _sampled_rollout(model, tokenizer)
    head = backbone_and_head(model)[1]
    with torch.no_grad():
        expected, _ = response_logprobs(model, rollout, 0.7)
        states = scaled_response_hidden(model, rollout, 0.7)
        sampled = rollout.response_ids[rollout.response_mask.bool()]
        kl, logprobs = categorical_kl_from_states(states, head, states, head, sampled, chunk_size=3)
        read = at_response_positions(logprobs, rollout)
    assert torch.allclose(read, expected, atol=1e-5) and kl.abs().max() < 1e-6
    assert (read[0, 2:] == 0).all() and (read[rollout.response_mask.bool()] < 0).all()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-tied-head"])
def test_fisher_vector_product_equals_the_double_backward_kl_hessian_product(tiny_model, lora):
    """The Gauss–Newton product (forward-mode J v, logit-space curvature, one backward) equals the
    Hessian of Σ_positions KL(π_old ‖ π_θ) at θ_old times v by double backward — with LoRA, and with
    every weight training, the LM head tied to the embeddings (its tangent enters twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rlhfkit.config import LoraSettings
    from rlhfkit.losses.trpo import categorical_kl
    from rlhfkit.models import attach_lora, backbone_and_head
    from rlhfkit.passes import fisher_vector_product, scaled_response_hidden

    source = resolve(str(tiny_model))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source, ModelSettings(), torch.float32)
    torch.manual_seed(0)
    if lora:
        model = attach_lora(model, LoraSettings(r=4, dropout=0.0))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, where J v would not see A
                torch.nn.init.normal_(parameter, std=0.1)
    model.eval()
    rollout = _sampled_rollout(model, tokenizer)
    parameters = [p for p in model.parameters() if p.requires_grad]
    vector = torch.randn(sum(p.numel() for p in parameters))
    head = backbone_and_head(model)[1]
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        states = scaled_response_hidden(model, rollout, 0.7)
        new = torch.log_softmax(states @ head.T, dim=-1)
        kl = categorical_kl(new.detach(), new).sum()
        gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, parameters, create_graph=True)])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(gradient @ vector, parameters)])
    product = fisher_vector_product(model, rollout, 0.7, parameters, vector, chunk_size=3)
    kept = scaled_response_hidden(model, rollout, 0.7)
    assert torch.allclose(product, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for _ in range(2):  # one forward graph reused across products
        again = fisher_vector_product(model, rollout, 0.7, parameters, vector, hidden=kept)
        assert torch.allclose(again, product, rtol=1e-5, atol=1e-6 * float(product.abs().max()))
    assert float(vector @ product) > 0  # positive semi-definite: v·Fv ≥ 0


def _rollout(prompt_width, response_width, completions):
    from rlhfkit.sampling import Rollout

    size = len(completions)
    return Rollout(
        prompt_ids=torch.full((size, prompt_width), 7),
        prompt_mask=torch.ones(size, prompt_width, dtype=torch.long),
        response_ids=torch.full((size, response_width), 8),
        response_mask=torch.ones(size, response_width),
        ended=torch.ones(size, dtype=torch.bool),
        prompt_index=torch.arange(size // 2).repeat_interleave(2),
        completions=list(completions),
    )


def test_flat_groups_are_replaced_by_groups_with_a_spread_of_rewards():
    import types

    from rlhfkit.rewards import ScoredBatch
    from rlhfkit.stages.refill import refill_flat_groups

    rollout = _rollout(3, 2, ["a", "b", "c", "d"])  # group 0 (a, b) is flat, group 1 (c, d) is not
    scored = ScoredBatch(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.ones(4, dtype=torch.bool), 0.75, 0)
    rounds = []

    def sample_and_score(examples, samples, seeds):
        rounds.append(seeds)
        if len(rounds) == 1:  # round 1: both new groups flat; round 2: the second has a spread
            return _rollout(2, 4, ["e", "f", "g", "h"]), ScoredBatch(
                torch.zeros(4), torch.ones(4, dtype=torch.bool), 0.0, 0
            )
        return _rollout(5, 1, ["i", "j", "k", "l"]), ScoredBatch(
            torch.tensor([0.0, 0.0, 2.0, 0.0]), torch.ones(4, dtype=torch.bool), 0.5, 0
        )

    sampler = types.SimpleNamespace(
        train_examples=list(range(10)),
        config=load_config("grpo", None, ["grpo.dynamic_sampling=true", "rollout.samples_per_prompt=2"]),
        tokenizer=types.SimpleNamespace(pad_token_id=0),
        sample_and_score=sample_and_score,
    )
    merged, merged_scores, replaced = refill_flat_groups(sampler, rollout, scored, rounds=3, step=5, process=0)
    assert replaced == 1 and len(rounds) == 2  # stopped once no group was flat
    assert merged.completions == ["k", "l", "c", "d"] and merged_scores.scores.tolist() == [2.0, 0.0, 0.0, 1.0]
    assert merged.prompt_ids.shape == (4, 5) and merged.response_ids.shape == (4, 2)  # padded to the widest
    assert merged.prompt_mask[2].tolist() == [0, 0, 1, 1, 1] and merged.response_mask[0].tolist() == [1.0, 0.0]
    assert merged.prompt_index.tolist() == [0, 0, 1, 1]
    assert rounds[0] != rounds[1]  # each round samples with its own seeds


def test_dynamic_sampling_rounds_refill_the_batch(tiny_model, prompt_file, reward_file, tmp_path):
    out = tmp_path / "dapo"
    config = rl_config(
        "grpo",
        tiny_model,
        prompt_file,
        reward_file,
        out,
        *("train.max_steps=3", "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_rounds=2", "eval.num_prompts=2"),
    )
    grpo.run(config)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and sum(record["train/refilled_groups"] for record in log) > 0


def test_the_flat_group_warning_tells_solved_prompts_from_unrewarded_ones():
    from rlhfkit.stages.grpo import describe_flat_groups

    def warning(*groups):
        rewards = torch.tensor([value for group in groups for value in group])
        flat = sum(len(set(group)) == 1 for group in groups) / len(groups)
        return describe_flat_groups(flat, rewards, 2, max_new_tokens=48)

    assert warning([1.0, 1.0], [0.0, 1.0], [1.0, 0.0]) is None  # a third of the groups flat: no warning
    solved = warning([1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0])
    assert solved.startswith("75% of groups have zero reward variance, most with every completion at the batch's top")
    assert "rollout.samples_per_prompt" in solved and "grpo.dynamic_sampling" in solved
    unrewarded = warning([0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0])
    assert unrewarded.startswith("75% of groups have zero reward variance: those groups give no policy gradient")
    assert "rollout.max_new_tokens=48" in unrewarded
    assert warning([0.0, 0.0], [0.0, 0.0]).startswith("every completion got the same reward (0)")
