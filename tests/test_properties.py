"""Property-based tests: whatever rows or settings a user writes, the loaders and the config
parser either accept them or raise the user-facing error naming where the problem is — never
a KeyError, TypeError or other traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit import registry
from rlhfkit.config.loading import load_config
from rlhfkit.data.examples import chat_examples, preference_examples, prompt_examples, text_examples
from rlhfkit.data.loading import Row
from rlhfkit.errors import ConfigError, DataError

COLUMNS = ["text", "prompt", "completion", "messages", "chosen", "rejected", "answer", "role", "content", "x"]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": json_scalars}
    ),
    max_size=4,
)
rows = st.lists(st.dictionaries(st.sampled_from(COLUMNS), json_values | messages, max_size=4), min_size=1, max_size=5)
PARSERS = [text_examples, chat_examples, preference_examples, prompt_examples]


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=rows, on_invalid=st.sampled_from(["error", "skip"]))
def test_row_parsers_accept_or_name_the_row(parse, values, on_invalid):
    parsed_rows = [Row(value, f"data.jsonl:{line}") for line, value in enumerate(values, start=1)]
    try:
        examples, report = parse(parsed_rows, on_invalid)
    except DataError as error:
        assert str(error).startswith("data.jsonl"), str(error)
        return
    assert 1 <= len(examples) == report.kept <= len(values)


STAGES = sorted(registry.names())
FIELDS = [
    "train.lr",
    "train.batch_size",
    "train.epochs",
    "lora.r",
    "lora.target_modules",
    "data.path",
    "data.max_length",
    "model.dtype",
    "model.name_or_path",
    "rollout.temperature",
    "dpo.beta",
    "grpo.beta",
    "eval.before",
    "train",
    "lora",
    "train.nonsense",
    "nonsense",
    "sampling.top_p",
    "models",
    "train.adam_betas",
]
override_values = st.sampled_from(
    ["0", "-1", "1e-4", "true", "null", "[]", "{}", "abc", "[1, 2]", "'8'", "1.5", "", "{a: 1}"]
)


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=60, deadline=None)
@given(assignments=st.lists(st.tuples(st.sampled_from(FIELDS), override_values), max_size=3))
def test_config_overrides_validate_or_name_the_field(stage, assignments):
    overrides = [f"{key}={value}" for key, value in assignments]
    try:
        load_config(stage, None, overrides)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(("(defaults)", "--set")), message
        named = {key.split(".")[0] for key, _ in assignments}
        assert any(name in message for name in named), (overrides, message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.sampled_from(["train", "lora", "data", "model", "junk"]), json_values, max_size=3))
def test_config_files_of_any_shape_validate_or_name_the_file(tree, tmp_path_factory):
    path = Path(tmp_path_factory.mktemp("config")) / "config.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    try:
        load_config("sft", path, [])
    except ConfigError as error:
        assert str(path) in str(error), str(error)


def test_a_jsonl_file_with_any_bytes_is_read_or_named(tmp_path):
    from rlhfkit.config import ChatDataSettings
    from rlhfkit.data.examples import load_examples

    for index, content in enumerate(
        [b"\xff\xfe\x00bad", b"{not json}\n", b"[1, 2]\n", json.dumps({"messages": 5}).encode() + b"\n"]
    ):
        path = tmp_path / f"data{index}.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError, match=str(path)):
            load_examples(ChatDataSettings(path=str(path), eval_fraction=0.0), 0, chat_examples)
