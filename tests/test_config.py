import time
from pathlib import Path

import pytest

from rlhfkit.config import SFTConfig
from rlhfkit.config.loading import apply_override, load_config
from rlhfkit.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_validate():
    config = load_config("sft", None)
    assert isinstance(config, SFTConfig)
    assert config.lora.enabled and config.lora.target_modules == "all-linear"


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(
        "sft",
        write(tmp_path, "train:\n  lr: 1.0e-3\n"),
        ["train.lr=5e-5", "lora.target_modules=[q_proj, v_proj]", "lora.enabled=false"],
    )
    assert config.train.lr == 5e-5
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.lora.enabled is False


def test_stage_section_of_a_multi_stage_file(tmp_path):
    path = write(tmp_path, "pretrain:\n  train:\n    epochs: 3\nsft:\n  train:\n    epochs: 5\n")
    assert load_config("pretrain", path).train.epochs == 3
    assert load_config("sft", path).train.epochs == 5


def test_unknown_key_names_field_and_file(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as error:
        load_config("sft", path)
    message = str(error.value)
    assert str(path) in message and "train.learning_rate" in message and "unknown key" in message


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=fast", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.epochs=-1", "train.epochs"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("data.overlong=cut", "data.overlong"),
        ("data.path=missing/file.jsonl", "data.path"),
        ("model.name_or_path=./no/such/model", "model.name_or_path"),
        ("train.grad_accum=two", "train.grad_accum"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as error:
        load_config("sft", write(tmp_path, "{}\n"), [override])
    assert field in str(error.value)


def test_errors_are_fast(tmp_path):
    started = time.perf_counter()
    with pytest.raises(ConfigError):
        load_config("pretrain", write(tmp_path, "data:\n  path: nope.jsonl\n"))
    assert time.perf_counter() - started < 1.0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("sft", tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("sft", write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config("sft", write(tmp_path, "- a list\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="is a value"):
        apply_override({"train": 3}, "train.lr=1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grpo.advantage=rloo", "rollout.samples_per_prompt=1"], "at least 2 for grpo.advantage rloo"),
        (
            ["grpo.dynamic_sampling=true", "rollout.samples_per_prompt=1"],
            "rollout.samples_per_prompt must be at least 2",
        ),
        (
            ["grpo.objective=cispo", "grpo.clip_high=0.28"],
            "with grpo.objective cispo the weight cap is grpo.cispo_max_weight",
        ),
        (["grpo.advantage=rloo", "grpo.scale_rewards=false"], "grpo.scale_rewards applies to advantage: group"),
        (["grpo.dynamic_sampling_rounds=2"], "grpo.dynamic_sampling_rounds re-samples for grpo.dynamic_sampling"),
        (
            ["rollout.correction=tis"],
            "corrects for a separate sampler \\(rollout.engine: vllm, int8, bf16 or float32\\)",
        ),
        (["rollout.engine=int8", "model.device=cuda"], "rollout.engine int8 is a CPU sampler"),
        (["rollout.engine=float32", "model.device=cuda"], "rollout.engine float32 is a CPU sampler"),
        (["rollout.correction=tis", "rollout.correction_cap=1"], "rollout.correction_cap"),
    ],
)
def test_rl_family_combinations_that_cannot_work_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("grpo", None, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing applies to loss: sigmoid"),
        (["dpo.loss=orpo", "dpo.precompute_reference=true"], "loss orpo uses no reference model"),
        (["dpo.loss=simpo", "dpo.precompute_reference=true"], "loss simpo uses no reference model"),
    ],
)
def test_dpo_settings_the_chosen_loss_would_ignore_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dpo", None, overrides)


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("sft", ["generation.engine=float32", "model.device=cuda"], "generation.engine float32 is a CPU sampler"),
        ("dpo", ["generation.engine=float32", "model.device=cuda"], "generation.engine float32 is a CPU sampler"),
        ("evaluate", ["sampling.engine=float32", "device=cuda"], "sampling.engine float32 is a CPU sampler"),
    ],
)
def test_the_answering_engine_is_checked_with_the_device(stage, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(stage, None, overrides)
    assert load_config(stage, None, [overrides[0]])  # on the CPU (or auto) it is accepted
    with pytest.raises(ConfigError, match=r"engine.*'auto', 'hf' or 'float32'"):
        load_config(stage, None, [overrides[0].replace("float32", "int8")])  # the copies sample other distributions


@pytest.mark.parametrize("stage", ["ppo", "trpo"])
def test_rollout_correction_is_refused_where_it_is_not_applied(stage):
    with pytest.raises(ConfigError, match=f"rollout.correction is applied by the grpo stage; {stage} does not"):
        load_config(stage, None, ["rollout.engine=vllm", "rollout.correction=tis"])


@pytest.mark.parametrize(
    "stage, override, field",
    [
        ("dpo", "dpo.loss=nope", "dpo.loss"),
        ("dpo", "dpo.beta=0", "dpo.beta"),
        ("dpo", "dpo.label_smoothing=0.7", "dpo.label_smoothing"),
        ("dpo", "eval.reward_modle=x", "eval.reward_modle"),
        ("reward", "loss.center_coef=-1", "loss.center_coef"),
        ("reward", "data.max_length=2", "data.max_length"),
    ],
)
def test_preference_stage_fields_are_checked(stage, override, field):
    with pytest.raises(ConfigError) as error:
        load_config(stage, None, [override])
    assert field in str(error.value)


@pytest.mark.parametrize(
    "stage, override, field",
    [
        ("ppo", "rollout.temperature=0", "rollout.temperature"),
        ("ppo", "rollout.top_p=1.5", "rollout.top_p"),
        ("ppo", "rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("ppo", "ppo.critic=shared", "ppo.critic"),
        ("grpo", "rollout.engine=fast", "rollout.engine"),
        ("ppo", "ppo.kl_estimator=k4", "ppo.kl_estimator"),
        ("ppo", "ppo.lam=1.5", "ppo.lam"),
        ("ppo", "ppo.target_kl=0", "ppo.target_kl"),
        ("ppo", "reward.output=softmax", "reward.output"),
        ("ppo", "reward.on_invalid=ignore", "reward.on_invalid"),
        ("grpo", "grpo.loss_aggregation=mean", "grpo.loss_aggregation"),
        ("grpo", "grpo.beta=-0.1", "grpo.beta"),
        ("grpo", "grpo.advantage=ppo", "grpo.advantage"),
        ("grpo", "grpo.importance_level=sentence", "grpo.importance_level"),
        ("grpo", "grpo.objective=sapo", "grpo.objective"),
        ("grpo", "grpo.clip_high=0.1", "grpo.clip_high (0.1) must be at least grpo.clip, ε_low (0.2)"),
        ("grpo", "grpo.cispo_max_weight=1", "grpo.cispo_max_weight"),
        ("grpo", "grpo.overlong_buffer=0", "grpo.overlong_buffer"),
        ("grpo", "grpo.overlong_buffer=999", "grpo.overlong_buffer (999) must be at most rollout.max_new_tokens"),
        ("grpo", "grpo.kl_penalty=kl", "grpo.kl_penalty"),
        ("grpo", "grpo.dynamic_sampling_rounds=-1", "grpo.dynamic_sampling_rounds"),
        ("grpo", "grpo.overlong_penalty=0", "grpo.overlong_penalty"),
        ("grpo", "grpo.drop_truncated=sometimes", "grpo.drop_truncated"),
        ("grpo", "grpo.dynamic_sampling=maybe", "grpo.dynamic_sampling"),
        ("grpo", "rollout.correction=ips", "rollout.correction"),
        ("grpo", "rollout.samples_per_prompt=1", "rollout.samples_per_prompt must be at least 2"),
        ("trpo", "trpo.max_kl=0", "trpo.max_kl"),
        ("trpo", "trpo.baseline=critic", "trpo.baseline"),
        ("trpo", "eval.samples_per_prompt=0", "eval.samples_per_prompt"),
        ("grpo", "data.sytem_prompt=x", "data.sytem_prompt"),
        ("evaluate", "models={}", "models: name at least one model"),
        ("evaluate", "reference=nobody", "reference: 'nobody' is not one of models"),
        ("evaluate", "num_prompts=-1", "num_prompts"),
        ("evaluate", "samples_per_prompt=0", "samples_per_prompt"),
        ("evaluate", "sampling.temperature=0", "sampling.temperature"),
        ("evaluate", "tie_margin=-0.1", "tie_margin"),
        ("evaluate", "judge_tie_margin=0.5", "judge_tie_margin"),
        ("evaluate", "warn.length_ratio=1", "warn.length_ratio"),
        ("evaluate", "warn.distinct_ratio=1.5", "warn.distinct_ratio"),
        ("evaluate", "train.lr=1e-4", "train: unknown key"),
        ("evaluate", "data.path=missing.jsonl", "data.path"),
    ],
)
def test_rl_stage_fields_are_checked(stage, override, field):
    with pytest.raises(ConfigError) as error:
        load_config(stage, None, [override])
    assert field in str(error.value)


@pytest.mark.parametrize(
    "name",
    [
        "llama3-8b-qlora-1gpu.yaml",
        "llama3-8b-lora-8gpu.yaml",
        "llama3-8b-full-8gpu-fsdp.yaml",
        "llama3-8b-full-8gpu-zero3.yaml",
    ],
)
def test_large_model_example_configs_validate(name, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs/examples" / name
    sft_config = load_config("sft", path)
    assert sft_config.train.gradient_checkpointing and sft_config.model.load_in_4bit == ("qlora" in name)
    if (
        "fsdp" in name or "zero3" in name
    ):  # float32 shards (master weights), bf16 compute from the launcher; full fine-tuning
        assert (
            sft_config.model.dtype == "float32" and not sft_config.lora.enabled and sft_config.train.grad_accum % 8 == 0
        )
        return
    assert sft_config.model.dtype == "bfloat16"
    # DPO starts from the SFT run, which must exist before its config validates.
    dpo_config = load_config("dpo", path, [f"model.name_or_path={tmp_path}"])
    assert dpo_config.model.load_in_4bit == ("qlora" in name)
    if "8gpu" in name:
        assert sft_config.train.grad_accum % 8 == 0 and dpo_config.train.grad_accum % 8 == 0


REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"needs {REAL_DATA} (the shared data folder)")
def test_the_real_data_pipeline_chains_sft_a_minilm_reward_model_and_ppo_on_hh_prompts(tmp_path, monkeypatch):
    import yaml

    from rlhfkit.data.examples import load_examples, prompt_examples

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # its data paths are relative to the repository, as in the docs' command
    tree = yaml.safe_load((root / "configs/examples/real_data_pipeline.yaml").read_text())
    tree["pipeline"]["output_dir"] = str(tmp_path / "real-data")  # not a run this machine may hold
    path = tmp_path / "real_data_pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert load_config("sft", path).train.output_dir == str(tmp_path / "real-data" / "sft")
    reward = load_config("reward", path)
    assert reward.model.name_or_path == "all-minilm-l6-v2" and reward.data.part == "1/2"
    with pytest.raises(ConfigError, match="real-data/sft does not exist yet: the sft stage writes it"):
        load_config("ppo", path)
    # the held-out judge is a run of its own (the evaluation page's command), not made here
    assert tree["ppo"]["eval"]["judges"]["held_out"]["model"] == "runs/hh-minilm-part2"
    judge = f"eval.judges.held_out.model={tmp_path}"
    ppo = load_config("ppo", path, [f"model.name_or_path={tmp_path}", f"reward.model={tmp_path}", judge])
    assert set(ppo.eval.judges) == {"held_out"}
    # the evaluation adds a judge of helpfulness, trained on OpenAssistant's own ranked replies
    helpfulness = load_config("reward", root / "configs/examples/reward_oasst_minilm.yaml")
    assert tree["evaluate"]["judges"]["helpfulness"]["model"] == helpfulness.train.output_dir
    assert tree["evaluate"]["judges"]["helpfulness"]["max_length"] == helpfulness.data.max_length
    train, held_out, _ = load_examples(ppo.data, ppo.train.seed, prompt_examples)
    assert (len(train), len(held_out)) == (1448, 360)  # prompts split off the HH transcripts


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"needs {REAL_DATA} (the shared data folder)")
def test_the_two_set_reward_config_holds_out_a_fifth_of_each_set(monkeypatch):
    from rlhfkit.data.loading import load_splits

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the config's data paths are relative to the checkout
    config = load_config("reward", root / "configs/examples/reward_hh_oasst.yaml")
    splits = load_splits(config.data, config.train.seed)
    held_out = {Path(source).parent.name: len(rows) for source, rows in splits.eval_parts.items()}
    assert held_out == {"hh-rlhf-harmless": 362, "oasst-en100-trees": 41} and len(splits.train) == 1450 + 166
