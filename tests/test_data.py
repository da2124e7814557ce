import json

import pytest

from conftest import write_jsonl
from rlhfkit.config import ChatDataSettings, TextDataSettings
from rlhfkit.data.examples import chat_examples, load_examples, text_examples
from rlhfkit.data.loading import builtin_file, load_splits, read_rows, source_labels
from rlhfkit.errors import DataError


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON"):
        read_rows(str(path))


def test_empty_file_and_wrong_encoding(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        read_rows(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl:1: not UTF-8"):
        read_rows(str(latin))


def test_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="list.jsonl:1: expected a JSON object"):
        read_rows(str(path))


def test_missing_column_names_row_and_suggests_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as error:
        chat_examples(read_rows(str(path)))
    message = str(error.value)
    assert "qa.jsonl:1" in message and "prompt" in message and "data.columns" in message


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    examples, _ = chat_examples(read_rows(str(path), columns={"prompt": "question", "completion": "answer"}))
    assert examples[0].messages[0] == {"role": "user", "content": "Why?"}


def test_bad_rows_named_or_skipped_with_counts(tmp_path):
    rows = [
        {"prompt": "ok", "completion": "fine"},
        {"prompt": "   ", "completion": "empty prompt"},
        {"prompt": "number", "completion": 3},
        {"prompt": "ok again", "completion": "fine"},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=r"sft.jsonl:2: column 'prompt' is empty"):
        chat_examples(read_rows(str(path)))
    examples, report = chat_examples(read_rows(str(path)), on_invalid="skip")
    assert len(examples) == 2
    assert report.skipped == {"empty prompt": 1, "non-string completion": 1}
    assert "2 skipped" in report.summary()


def test_duplicate_rows_are_kept_and_counted(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": "d"},
        {"completion": "b", "prompt": "a"},
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": "B"},
    ]
    examples, report = chat_examples(read_rows(str(write_jsonl(tmp_path / "sft.jsonl", rows))))
    assert len(examples) == 5 and report.duplicates == 2  # key order does not matter; case does
    assert report.summary() == "5 rows (2 duplicates of earlier rows, kept)"


def test_messages_rows_validated(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match="chat.jsonl:2: messages has no assistant turn"):
        chat_examples(read_rows(str(path)))
    _, report = chat_examples(read_rows(str(path)), on_invalid="skip")
    assert report.kept == 1 and sum(report.skipped.values()) == 2


def test_text_kind(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": ""}])
    with pytest.raises(DataError, match="t.jsonl:2: column 'text' is empty"):
        text_examples(read_rows(str(path)))


def test_every_row_invalid(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(DataError, match="every row was invalid"):
        text_examples(read_rows(str(path)), on_invalid="skip")


def test_csv_json_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(4)))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.csv", "d.parquet", "saved"):
        loaded = read_rows(str(tmp_path / name))
        assert [row.values["prompt"] for row in loaded] == ["p0", "p1", "p2", "p3"], name
    assert read_rows(str(tmp_path / "d.csv"))[1].where.endswith("d.csv:3")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a saved `datasets` directory"):
        read_rows(str(tmp_path))


def test_eval_split_by_fraction_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)])
    settings = TextDataSettings(path=str(path), eval_fraction=0.25)
    first, again = load_splits(settings, seed=1), load_splits(settings, seed=1)
    assert len(first.eval) == 5 and len(first.train) == 15
    assert [r.where for r in first.eval] == [r.where for r in again.eval]
    assert not {r.where for r in first.eval} & {r.where for r in first.train}


def test_parts_are_disjoint_cover_the_training_rows_and_follow_the_prompt(tmp_path):
    rows = [{"prompt": f"question {i // 2}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    whole = load_splits(ChatDataSettings(path=str(path), eval_fraction=0.2), seed=3)
    parts = [load_splits(ChatDataSettings(path=str(path), eval_fraction=0.2, part=f"{k}/2"), seed=3) for k in (1, 2)]
    first, second = ({r.where for r in split.train} for split in parts)
    assert not first & second and first | second == {r.where for r in whole.train}
    assert 10 <= len(first) <= 38  # about half of the 48 training rows
    assert all([r.where for r in split.eval] == [r.where for r in whole.eval] for split in parts)
    for split in parts:  # both pairs about one prompt land in one part
        prompts = [r.values["prompt"] for r in split.train]
        assert not {p for p in prompts} & {
            r.values["prompt"] for other in parts if other is not split for r in other.train
        }
    other_seed = load_splits(ChatDataSettings(path=str(path), eval_fraction=0.0, part="1/2"), seed=9)
    assert {r.values["prompt"] for r in parts[0].train} <= {r.values["prompt"] for r in other_seed.train}


@pytest.mark.parametrize("part", ["0/2", "3/2", "1/1", "half", "1/"])
def test_a_part_that_is_not_k_of_n_is_refused(tmp_path, part):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="part"):
        ChatDataSettings(path=str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])), part=part)


def test_eval_from_second_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c"}])
    splits = load_splits(TextDataSettings(path=str(train), eval_path=str(held_out)), seed=0)
    assert len(splits.train) == 2 and splits.eval[0].values["text"] == "c"


def test_mixed_sources_are_split_each_on_its_own_and_joined(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "pairs.jsonl", [{"text": f"a {i}"} for i in range(20)])
    second = write_jsonl(tmp_path / "b" / "pairs.jsonl", [{"text": f"b {i}"} for i in range(8)])
    alone = load_splits(TextDataSettings(path=str(first), eval_fraction=0.25), seed=4)
    mixed = load_splits(TextDataSettings(path=str(first), mix=[str(second)], eval_fraction=0.25), seed=4)
    assert list(mixed.eval_parts) == [str(first), str(second)]
    assert mixed.eval_parts[str(first)] == alone.eval  # path's split is the one it has alone
    assert [r.values["text"][0] for r in mixed.eval] == ["a"] * 5 + ["b"] * 2
    assert len(mixed.train) == 15 + 6 and mixed.train[:15] == alone.train
    assert not {r.where for r in mixed.eval} & {r.where for r in mixed.train}
    capped = load_splits(TextDataSettings(path=str(first), mix=[str(second)], max_examples=17), seed=4)
    assert len(capped.train) == 17  # the cap counts the joined rows
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c"}])
    one_eval = load_splits(TextDataSettings(path=str(first), mix=[str(second)], eval_path=str(held_out)), seed=4)
    assert len(one_eval.train) == 28 and list(one_eval.eval_parts) == [str(held_out)]
    builtin_and_file = load_splits(TextDataSettings(mix=[str(second)], eval_fraction=0.5), seed=0)
    assert len(builtin_and_file.eval_parts[str(second)]) == 4 and builtin_and_file.eval_parts["builtin:tutor-corpus"]


def test_a_mixed_source_weight_repeats_or_thins_its_training_rows_only(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(20)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(8)])
    once = load_splits(TextDataSettings(path=str(first), mix=[str(second)], eval_fraction=0.25), seed=4)
    for weight, copies in ((2.5, 15), (3, 18), (0.5, 3)):
        weighted = load_splits(TextDataSettings(path=str(first), mix={str(second): weight}, eval_fraction=0.25), seed=4)
        assert weighted.eval_parts == once.eval_parts  # held-out rows are never repeated
        assert weighted.train[:15] == once.train[:15]
        mixed_rows = weighted.train[15:]
        assert len(mixed_rows) == copies and {r.where for r in mixed_rows} <= {r.where for r in once.train[15:]}
        assert mixed_rows[: 6 * int(weight)] == once.train[15:] * int(weight)
    again = load_splits(TextDataSettings(path=str(first), mix={str(second): 0.5}, eval_fraction=0.25), seed=4)
    assert again.train == weighted.train  # the thinned share is seeded
    settings = TextDataSettings(path=str(first), mix={str(second): 2.5}, eval_fraction=0.25)
    _, _, report = load_examples(settings, 4, text_examples)
    assert report.summary() == "30 rows (9 copies by data.mix weights)"  # 15 + 6 × 2.5; not reported as duplicates
    with pytest.raises(ValueError, match="mix(.|\\n)*weight 0 must be above 0"):
        TextDataSettings(path=str(first), mix={str(second): 0})
    with pytest.raises(ValueError, match="mix(.|\\n)*valid number"):
        TextDataSettings(path=str(first), mix={str(second): "lots"})


def test_the_seeded_split_keeps_every_copy_of_a_row_on_one_side(tmp_path):
    rows = [{"prompt": f"q {i}", "answer": i} for i in range(10)]
    path = write_jsonl(tmp_path / "problems.jsonl", rows + rows[:4])  # a file that repeats problems
    splits = load_splits(ChatDataSettings(path=str(path), eval_fraction=0.3), seed=1)
    held_out = [row.values["prompt"] for row in splits.eval]
    assert held_out == ["q 0", "q 3", "q 0", "q 3"]  # two repeated problems fill the four places, both copies
    assert not set(held_out) & {row.values["prompt"] for row in splits.train}
    assert len(splits.train) == 14 - 4
    unique = write_jsonl(tmp_path / "unique.jsonl", rows)
    assert len(load_splits(ChatDataSettings(path=str(unique), eval_fraction=0.3), seed=1).eval) == 3


def test_a_mixed_source_that_is_missing_or_listed_twice_is_refused(tmp_path):
    from pydantic import ValidationError

    path = str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]))
    with pytest.raises(ValidationError, match="mix(.|\\n)*data file does not exist: .*nope.jsonl"):
        TextDataSettings(path=path, mix=[str(tmp_path / "nope.jsonl")])
    for mix in ([path], ["builtin:tutor-corpus", "builtin:tutor-corpus"]):
        with pytest.raises(ValidationError, match="mix(.|\\n)*listed twice"):
            TextDataSettings(path=path, mix=mix)


def test_source_labels_drop_the_directory_every_source_shares():
    assert source_labels(["../d/hh/pairs.jsonl", "../d/oasst/pairs.jsonl"]) == {
        "../d/hh/pairs.jsonl": "hh/pairs.jsonl",
        "../d/oasst/pairs.jsonl": "oasst/pairs.jsonl",
    }
    assert source_labels(["builtin:tutor-prefs", "d/x.jsonl"]) == {
        "builtin:tutor-prefs": "builtin:tutor-prefs",
        "d/x.jsonl": "d/x.jsonl",
    }
    assert source_labels(["/abs/x.jsonl", "rel/x.jsonl"])["/abs/x.jsonl"] == "/abs/x.jsonl"
    assert source_labels(["only/one.jsonl"]) == {"only/one.jsonl": "only/one.jsonl"}


def test_builtin_datasets_are_valid():
    for name, kind in (("tutor-corpus", text_examples), ("tutor-sft", chat_examples)):
        train_file, eval_file = builtin_file(name)
        train, _ = kind(read_rows(str(train_file)))
        held_out, _ = kind(read_rows(str(eval_file)))
        assert len(train) > len(held_out) > 0
    splits = load_splits(ChatDataSettings(), seed=0)
    assert len(splits.train) == 175 and len(splits.eval) == 25
    corpus_bytes = sum(len(row.values["text"]) for row in load_splits(TextDataSettings(), seed=0).train)
    assert corpus_bytes > 40_000
    with pytest.raises(DataError, match="unknown built-in dataset"):
        builtin_file("nope")


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/not-here'"):
        read_rows("someone/not-here")
