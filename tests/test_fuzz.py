"""The fuzz tier (slow): thousands of generated inputs per loader, each either accepted or refused
with rlhfkit's own one-line error naming the file, row or field — never a traceback. Each test
draws RLHFKIT_FUZZ_CASES inputs (500 unless set; `RLHFKIT_FUZZ_CASES=5000` searches deeper).

The shapes are the ones careless or hostile inputs take: arbitrary bytes, any Unicode (lone
surrogates included), CSV rows of any width with quotes and separators inside fields, arbitrary
JSON values, and arbitrary config trees and override values for every stage.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit import registry
from rlhfkit.config.loading import load_config
from rlhfkit.data.examples import chat_examples, preference_examples, prompt_examples, text_examples
from rlhfkit.data.loading import read_rows
from rlhfkit.errors import ConfigError, DataError, UserError

pytestmark = pytest.mark.slow
CASES = int(os.environ.get("RLHFKIT_FUZZ_CASES", "500"))  # per test; each loader is reached by several tests
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
PARSERS = [text_examples, chat_examples, preference_examples, prompt_examples]
COLUMNS = ["text", "prompt", "completion", "messages", "chosen", "rejected", "answer", "role", "content", ""]

# Any code point, surrogates included (hypothesis leaves them out unless asked).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | any_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(COLUMNS) | any_text, children, max_size=4)
    ),
    max_leaves=12,
)
row_values = st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=5)


def read_and_parse(path: Path) -> None:
    """read_rows then every parser: accepted, or a DataError that names the file."""
    try:
        rows = read_rows(str(path))
    except DataError as error:
        assert str(path) in str(error), str(error)
        return
    for parse in PARSERS:
        for on_invalid in ("error", "skip"):
            try:
                parse(rows, on_invalid)
            except DataError as error:
                assert str(path) in str(error), str(error)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@FUZZ
@given(content=st.binary(max_size=200))
def test_arbitrary_bytes_in_a_data_file(folder, suffix, content):
    path = folder / f"bytes{suffix}"
    path.write_bytes(content)
    read_and_parse(path)


@FUZZ
@given(values=st.lists(row_values | json_values, min_size=0, max_size=6), bom=st.booleans())
def test_arbitrary_json_values_one_per_line(folder, values, bom):
    # ensure_ascii: lone surrogates are written as \ud800 escapes, valid JSON that is not Unicode
    text = "".join(json.dumps(value) + "\n" for value in values)
    path = folder / "values.jsonl"
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    read_and_parse(path)


@FUZZ
@given(value=json_values | st.lists(row_values, max_size=6))
def test_an_arbitrary_json_document(folder, value):
    path = folder / "document.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    read_and_parse(path)


cells = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@FUZZ
@given(
    header=st.lists(st.sampled_from(COLUMNS[:-1]) | cells, min_size=1, max_size=4),
    table=st.lists(st.lists(cells, min_size=0, max_size=6), max_size=6),
)
def test_csv_rows_of_any_width(folder, header, table):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(table)
    path = folder / "table.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    read_and_parse(path)


STAGES = sorted(registry.names())
SECTIONS = ["model", "data", "train", "lora", "rollout", "reward", "eval", "generation", "dpo", "grpo", "ppo", "trpo"]
KEYS = ["lr", "batch_size", "path", "name_or_path", "max_length", "beta", "clip", "advantage", "epochs", "r", "x"]


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=CASES // 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    tree=st.dictionaries(
        st.sampled_from(SECTIONS) | any_text,
        st.dictionaries(st.sampled_from(KEYS), json_values) | json_values,
        max_size=4,
    )
)
def test_config_files_of_any_shape_for_every_stage(folder, stage, tree):
    path = folder / "config.yaml"
    try:
        path.write_text(yaml.safe_dump(tree, allow_unicode=False), encoding="utf-8")
    except yaml.YAMLError:
        return  # not something a YAML file can hold
    try:
        load_config(stage, path, [])
    except ConfigError as error:
        assert str(path) in str(error), str(error)


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=CASES // 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    assignments=st.lists(
        st.tuples(
            st.builds(lambda section, key: f"{section}.{key}", st.sampled_from(SECTIONS), st.sampled_from(KEYS)),
            st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10),
        ),
        max_size=3,
    )
)
def test_override_values_of_any_text_for_every_stage(stage, assignments):
    try:
        load_config(stage, None, [f"{key}={value}" for key, value in assignments])
    except ConfigError as error:
        assert str(error).startswith(("(defaults)", "--set")), str(error)


@settings(max_examples=CASES // 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=st.binary(max_size=300))
def test_a_labeling_store_of_arbitrary_bytes_is_refused_by_name(folder, content):
    from rlhfkit.labeling.store import LabelStore

    path = folder / "labels.db"
    path.write_bytes(content)
    try:
        LabelStore(path).close()
    except UserError as error:
        assert str(path) in str(error), str(error)
