"""Unpaired feedback rows (prompt, completion, label 👍/👎, rating): reading, checking, batching."""

import pytest
import torch

from conftest import write_jsonl
from rlhfkit.data.batching import feedback_batches
from rlhfkit.data.examples import feedback_examples, label_counts
from rlhfkit.data.formatting import TokenizedFeedback
from rlhfkit.data.loading import read_rows
from rlhfkit.errors import DataError


def examples(tmp_path, rows, on_invalid="error", name="feedback.jsonl"):
    return feedback_examples(read_rows(str(write_jsonl(tmp_path / name, rows)), "jsonl"), on_invalid)


def test_labels_in_every_form_people_write_them(tmp_path):
    rows = [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": "q", "completion": "b", "label": 0},
        {"prompt": "q", "completion": "c", "label": "Yes", "rating": 4},
        {"prompt": [{"role": "user", "content": "q2"}], "completion": "d", "label": "false", "rating": "2"},
    ]
    kept, report = examples(tmp_path, rows)
    assert [e.label for e in kept] == [True, False, True, False] and report.kept == 4
    assert [e.rating for e in kept] == [None, None, 4.0, 2.0]
    assert kept[3].prompt == ({"role": "user", "content": "q2"},) and kept[3].where.endswith("feedback.jsonl:4")


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "q", "completion": "a", "label": "maybe"},
            "feedback.jsonl:1: column 'label' must be true or false",
        ),
        ({"prompt": "q", "completion": "a", "label": 2}, "column 'label' must be true or false"),
        ({"prompt": "q", "completion": "a", "label": True, "rating": 6}, "'rating' must be a number from 1 to 5"),
        ({"prompt": "q", "completion": "a", "label": True, "rating": "good"}, "'rating' must be a number from 1 to 5"),
        ({"prompt": "q", "completion": "", "label": True}, "column 'completion' is empty"),
        ({"prompt": "q", "answer": "a", "label": True}, "expected `prompt`, `completion` and `label`"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        examples(tmp_path, [row])


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": "?"}]
    kept, report = examples(tmp_path, rows, "skip")
    assert len(kept) == 1 and report.skipped == {"bad label": 1}


def test_preference_rows_are_unpaired_into_a_liked_and_a_disliked_answer(tmp_path):
    kept, report = examples(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert [(e.completion, e.label) for e in kept] == [("good", True), ("bad", False)] and report.kept == 1
    assert kept[0].where.endswith("feedback.jsonl:1 (chosen)")


def test_one_class_only_is_refused_with_the_counts(tmp_path):
    kept, _ = examples(tmp_path, [{"prompt": "q", "completion": c, "label": True} for c in "abc"])
    with pytest.raises(DataError, match="3 desirable .* and 0 undesirable"):
        label_counts(kept, "feedback.jsonl")
    assert label_counts(examples(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])[0], "x") == (1, 1)


def test_each_example_is_packed_beside_another_examples_answer():
    data = [TokenizedFeedback([1, 2], [10 + i, 20 + i], i % 2 == 0) for i in range(5)]
    first, last = feedback_batches(data, batch_size=3, max_length=64, seed=None)
    # batch [0, 1, 2]: pair i holds (x_i, y_i) and (x_i, y_{i-1}), rotated within the batch
    row = first.pairs.input_ids[0].tolist()  # without shared prompts: the 3 labelled sequences, then the 3 others
    assert row[:12] == [1, 2, 10, 20, 1, 2, 11, 21, 1, 2, 12, 22] and first.labels.tolist() == [True, False, True]
    assert first.pairs.target_ids.tolist()[6:] == [12, 22, 10, 20, 11, 21]  # the mismatched answers y_2, y_0, y_1
    # a batch of two rotates the pair; lengths of both answers are counted per sequence
    assert last.pairs.pair_ids.tolist() == [3, 4] and last.pairs.target_ids.tolist()[4:] == [14, 24, 13, 23]
    assert last.loss_units == 2 and last.pairs.answer_lengths.tolist() == [2, 2, 2, 2]


def test_a_batch_of_one_borrows_the_answer_before_it_and_long_answers_are_cut():
    data = [TokenizedFeedback([1, 2, 3], [10, 11], True), TokenizedFeedback([1], [20, 21, 22, 23], False)]
    first, second = feedback_batches(data, batch_size=1, max_length=5, seed=None)
    assert first.pairs.target_ids.tolist() == [10, 11, 20, 21]  # y' = y_1 cut to 5 − 3 prompt tokens
    assert second.pairs.target_ids.tolist() == [20, 21, 22, 23, 10, 11]
    shuffled = feedback_batches(data, batch_size=2, max_length=64, seed=3)
    assert sorted(shuffled[0].pairs.pair_ids.tolist()) == [0, 1] and shuffled[0].labels.dtype == torch.bool
