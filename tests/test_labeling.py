"""The labeling store, the majority rule and agreement, the reward-model judge, and export into `rlhfkit reward`."""

import json
import sqlite3
import threading

import pytest

from conftest import QUESTIONS, write_jsonl
from rlhfkit.cli import main
from rlhfkit.config.loading import load_config
from rlhfkit.data.examples import preference_examples
from rlhfkit.data.loading import read_rows
from rlhfkit.errors import UserError
from rlhfkit.labeling.agreement import agreement_report, cohens_kappa, fleiss_kappa, majority_label, percent_agreement
from rlhfkit.labeling.commands import export_preferences, generate_candidates
from rlhfkit.labeling.schema import SCHEMA, SCHEMA_VERSION
from rlhfkit.labeling.store import LabelStore, SubmissionConflict
from rlhfkit.stages import reward

PROMPTS = QUESTIONS[:4]


def filled_store(path, required=1):
    store = LabelStore(path, create=True)
    for index, question in enumerate(PROMPTS):
        prompt = ({"role": "user", "content": question},)
        store.add_candidates(prompt, [("m1", f"A clear answer {index}."), ("m2", f"No idea {index}.")], required)
    return store


def test_submissions_are_idempotent_and_later_ones_replace_earlier_with_history(tmp_path):
    store = filled_store(tmp_path / "labels.db")
    token = store.add_annotator("alice")
    annotator_id, name = store.annotator_for_token(token)
    assert name == "alice" and store.annotator_for_token(token + "x") is None
    assert store.submit(1, annotator_id, "a", left="b", submission_id="s1") is True
    assert store.submit(1, annotator_id, "a", left="b", submission_id="s1") is False  # a retry or double click
    store.submit(1, annotator_id, "tie", left="a", submission_id="s2")
    assert store.history(1, annotator_id) == ["a", "tie"]
    (current,) = store.current_judgements()
    assert (current.pair_id, current.annotator, current.choice, current.left) == (1, "alice", "tie", "a")
    with pytest.raises(KeyError):
        store.submit(999, annotator_id, "a", left="a", submission_id="s3")
    with pytest.raises(ValueError):
        store.submit(1, annotator_id, "left", left="a", submission_id="s4")
    with pytest.raises(UserError, match="already exists"):
        store.add_annotator("alice")
    with pytest.raises(UserError, match="already a human annotator"):  # a judge never writes over a person's labels
        store.record_judge("alice", [(1, "b")])
    assert [j.choice for j in store.current_judgements()] == ["tie"]
    store.close()
    assert token.encode() not in (tmp_path / "labels.db").read_bytes()  # only the token's hash is stored


def test_parallel_writers_store_every_judgement_exactly_once(tmp_path):
    path = tmp_path / "labels.db"
    store = filled_store(path)
    ids = [store.annotator_for_token(store.add_annotator(f"annotator{i}"))[0] for i in range(4)]
    store.close()
    errors = []

    def label(annotator_id):
        local = LabelStore(path)  # one connection per thread, as the server has
        try:
            for pair_id in range(1, len(PROMPTS) + 1):
                for _ in range(3):  # every submission is sent three times
                    local.submit(pair_id, annotator_id, "a", left="a", submission_id=f"{annotator_id}-{pair_id}")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            local.close()

    threads = [threading.Thread(target=label, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = sqlite3.connect(path).execute("SELECT COUNT(*), COUNT(DISTINCT submission_id) FROM judgements").fetchone()
    assert rows == (4 * len(PROMPTS), 4 * len(PROMPTS))


@pytest.mark.parametrize(
    "choices, label",
    [
        (["a", "a", "b"], "a"),
        (["b"], "b"),
        (["a", "b"], None),
        (["a", "tie", "tie"], "a"),
        (["both_bad", "both_bad", "a"], None),
        (["both_bad", "a", "a"], "a"),
        (["tie"], None),
        ([], None),
    ],
)
def test_majority_rule(choices, label):
    assert majority_label(choices) == label


def test_agreement_statistics_match_hand_computations():
    # Cohen: p_o = 3/4; p_e = 0.5·0.25 + 0.5·0.75 = 0.5; κ = (0.75 − 0.5) / 0.5 = 0.5.
    assert cohens_kappa(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(0.5)
    # Fleiss, 2 raters: item 1 {a, a} -> P = 1, item 2 {a, b} -> P = 0; P̄ = 0.5; p_a = 3/4, p_b = 1/4,
    # P̄_e = 10/16; κ = (0.5 − 0.625) / 0.375 = −1/3.
    assert fleiss_kappa([{"a": 2}, {"a": 1, "b": 1}]) == pytest.approx(-1 / 3)
    table = {1: {"x": "a", "y": "a"}, 2: {"x": "a", "y": "b"}, 3: {"x": "b"}}
    assert percent_agreement(table) == 0.5
    report = agreement_report(table)
    assert report["cohens_kappa"]["x vs y"]["items"] == 2 and report["fleiss_kappa"]["items"] == 2
    with pytest.raises(ValueError):
        fleiss_kappa([{"a": 2}, {"a": 3}])


def test_export_holds_exactly_the_majority_labels_and_trains_a_reward_model(tmp_path, tiny_model, capsys):
    path = tmp_path / "labels.db"
    store = filled_store(path, required=2)
    alice, bob = (store.annotator_for_token(store.add_annotator(name))[0] for name in ("alice", "bob"))
    votes = {1: ("a", "a"), 2: ("b", "a"), 3: ("both_bad", "both_bad"), 4: ("a", None)}
    for pair_id, (first, second) in votes.items():
        store.submit(pair_id, alice, first, left="a", submission_id=f"alice-{pair_id}")
        if second:
            store.submit(pair_id, bob, second, left="b", submission_id=f"bob-{pair_id}")
    store.close()
    stats = export_preferences(str(path), str(tmp_path / "prefs.jsonl"))
    assert (stats["exported"], stats["no_majority"], stats["too_few_votes"]) == (1, 2, 1)
    (row,) = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert (
        row["chosen"] == "A clear answer 0."
        and row["rejected"] == "No idea 0."
        and row["votes"] == {"alice": "a", "bob": "a"}
    )
    assert json.loads((tmp_path / "prefs.jsonl.stats.json").read_text())["agreement"][
        "percent_agreement"
    ] == pytest.approx(2 / 3)

    # With min_votes 1 every pair with a winner is exported; that file trains a reward model unchanged.
    assert main(["label", "export", str(path), str(tmp_path / "all.jsonl"), "--min-votes", "1"]) == 0
    examples, _ = preference_examples(read_rows(str(tmp_path / "all.jsonl")))
    assert len(examples) == 2 and examples[0].prompt == ({"role": "user", "content": "Why is the sky blue?"},)
    config = load_config(
        "reward",
        None,
        [
            f"model.name_or_path={tiny_model}",
            f"data.path={tmp_path / 'all.jsonl'}",
            "data.eval_fraction=0",
            f"train.output_dir={tmp_path / 'rm'}",
            "train.trackers=[]",
            "train.max_steps=2",
            "train.batch_size=2",
        ],
    )
    reward.run(config)
    assert (tmp_path / "rm" / "final").is_dir()


def test_generate_judge_and_export_with_the_cli(tmp_path, tiny_model, tiny_reward_model, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in PROMPTS])
    store = tmp_path / "labels.db"
    assert (
        main(
            [
                "label",
                "generate",
                str(store),
                "--model",
                str(tiny_model),
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "8",
                "--temperature",
                "1.0",
            ]
        )
        == 0
    )
    pair_count = len(LabelStore(store).pair_ids())
    assert 1 <= pair_count <= len(PROMPTS)
    pair = LabelStore(store).pair(1)
    assert pair.response_a != pair.response_b and pair.model_a == str(tiny_model)
    assert main(["label", "annotator", str(store), "carol"]) == 0
    assert "sign-in token" in capsys.readouterr().out
    assert main(["label", "judge", str(store), "--reward-model", str(tiny_reward_model), "--name", "rm"]) == 0
    assert f"judged {pair_count} pairs" in capsys.readouterr().out
    judged = LabelStore(store).current_judgements(kinds=("judge",))
    assert [j.annotator for j in judged] == ["rm"] * pair_count
    assert main(["label", "export", str(store), str(tmp_path / "judge.jsonl"), "--from", "judge"]) == 0
    assert main(["label", "export", str(store), str(tmp_path / "human.jsonl")]) == 0
    assert (tmp_path / "human.jsonl").read_text() == ""  # carol has labelled nothing yet
    assert (
        main(["label", "generate", str(store), "--model", str(tiny_model), "--prompts", str(tmp_path / "absent.jsonl")])
        == 2
    )
    assert main(["label", "export", str(tmp_path / "absent.db"), str(tmp_path / "x.jsonl")]) == 2
    with pytest.raises(UserError, match="engine must be one of auto, hf, float32, got 'fast'"):
        generate_candidates(str(store), str(tiny_model), str(tmp_path / "absent.jsonl"), engine="fast")


def test_llm_judge_asks_in_both_orders_so_swapping_the_answers_mirrors_its_verdict(tiny_model, tmp_path):
    import torch

    from rlhfkit.labeling.commands import llm_preferences
    from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32).eval()
    prompts, first, second = (
        ["Why is the sky blue?", "What is the sun?"],
        ["Light scatters.", "A star."],
        ["No idea.", "Go away, it is hot."],
    )
    forward = llm_preferences(model, tokenizer, prompts, first, second)
    backward = llm_preferences(model, tokenizer, prompts, second, first)
    assert all(0 <= p <= 1 for p in forward)
    assert forward == pytest.approx([1 - p for p in backward], abs=1e-5)  # position bias cancels by construction
    # Batching and left padding do not change a verdict.
    assert llm_preferences(model, tokenizer, prompts[:1], first[:1], second[:1]) == pytest.approx(forward[:1], abs=1e-5)

    path = tmp_path / "labels.db"
    filled_store(path).close()
    assert (
        main(["label", "judge", str(path), "--llm", str(tiny_model), "--name", "tiny-judge", "--tie-margin", "0"]) == 0
    )
    judged = LabelStore(path).current_judgements(kinds=("judge",))
    assert len(judged) == len(PROMPTS) and {j.annotator for j in judged} == {"tiny-judge"}
    with pytest.raises(SystemExit):  # one judge at a time (argparse refuses both)
        main(["label", "judge", str(path), "--llm", str(tiny_model), "--reward-model", str(tiny_model)])


def test_submission_ids_are_per_annotator_and_a_reused_id_with_another_body_is_refused(tmp_path):
    store = filled_store(tmp_path / "labels.db")
    alice, bob = (store.annotator_for_token(store.add_annotator(name))[0] for name in ("alice", "bob"))
    assert store.submit(1, alice, "a", left="a", submission_id="same-id") is True
    assert store.submit(2, bob, "b", left="a", submission_id="same-id") is True  # Bob's own id, not Alice's
    assert {(j.pair_id, j.annotator, j.choice) for j in store.current_judgements()} == {
        (1, "alice", "a"),
        (2, "bob", "b"),
    }
    with pytest.raises(SubmissionConflict, match="same-id"):
        store.submit(3, alice, "a", left="a", submission_id="same-id")
    assert store.submit(1, alice, "a", left="a", submission_id="same-id") is False  # the identical retry
    assert len(store.current_judgements()) == 2
    store.close()


def test_a_store_written_with_globally_unique_submission_ids_is_upgraded_keeping_every_judgement(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        SCHEMA
        + """
        CREATE TABLE judgements (
            id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
            annotator_id INTEGER NOT NULL REFERENCES annotators(id),
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')), comment TEXT NOT NULL DEFAULT '',
            left TEXT NOT NULL CHECK (left IN ('a', 'b')),
            submission_id TEXT NOT NULL UNIQUE, current INTEGER CHECK (current = 1), created TEXT NOT NULL);
        CREATE UNIQUE INDEX one_current ON judgements (pair_id, annotator_id, current);
        INSERT INTO prompts VALUES (1, '[]', 't');
        INSERT INTO responses VALUES (1, 1, 'm', 'x', 't'), (2, 1, 'm', 'y', 't');
        INSERT INTO pairs VALUES (1, 1, 1, 2, 1);
        INSERT INTO annotators VALUES (1, 'alice', 'human', NULL, 't'), (2, 'bob', 'human', NULL, 't');
        INSERT INTO judgements VALUES (1, 1, 1, 'a', '', 'a', 's1', NULL, 't'), (2, 1, 1, 'b', 'ok', 'b', 's2', 1, 't');
    """
    )
    old.close()
    store = LabelStore(path)
    assert store.history(1, 1) == ["a", "b"]
    assert [(j.annotator, j.choice, j.comment) for j in store.current_judgements()] == [("alice", "b", "ok")]
    assert store.submit(1, 2, "a", left="a", submission_id="s2") is True  # Alice's id, now free for Bob
    with pytest.raises(sqlite3.IntegrityError):  # still one current judgement per annotator and pair
        store.connection.execute("UPDATE judgements SET current = 1 WHERE id = 1")
    store.close()
    assert LabelStore(path).connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


@pytest.mark.parametrize("output", ["labels.db", "./labels.db", "labels.db-wal", "folder", "x"])
def test_export_never_writes_over_its_store_nor_into_a_directory(tmp_path, capsys, output, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = filled_store(tmp_path / "labels.db")
    alice = store.annotator_for_token(store.add_annotator("alice"))[0]
    store.submit(1, alice, "a", left="a", submission_id="s1")
    store.close()
    (tmp_path / "folder").mkdir()
    if output == "x":  # x.stats.json, written beside the export, would be the store
        (tmp_path / "labels.db").rename(tmp_path / "x.stats.json")
        assert main(["label", "export", "x.stats.json", "x"]) == 2
        store_path = tmp_path / "x.stats.json"
    else:
        assert main(["label", "export", "labels.db", output]) == 2
        store_path = tmp_path / "labels.db"
    assert "error: export output" in capsys.readouterr().err
    assert [j.choice for j in LabelStore(store_path).current_judgements()] == ["a"]


def test_label_commands_name_a_file_that_is_not_a_store(tmp_path, capsys):
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p"}\n')
    (tmp_path / "folder").mkdir()
    for path in ("prefs.jsonl", "folder"):
        assert main(["label", "export", str(tmp_path / path), str(tmp_path / "out.jsonl")]) == 2
        assert main(["label", "annotator", str(tmp_path / path), "alice"]) == 2
        err = capsys.readouterr().err
        assert "not a labeling store" in err or "is a directory" in err
    assert (tmp_path / "prefs.jsonl").read_text() == '{"prompt": "p"}\n'


def test_opening_a_file_that_is_not_a_store_writes_nothing_into_it(tmp_path):
    import sqlite3

    from rlhfkit.errors import UserError
    from rlhfkit.labeling.store import LabelStore

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER)")
    for path in (empty, other):
        before = path.read_bytes()
        with pytest.raises(UserError, match=f"{path}: not a labeling store"):
            LabelStore(path)
        assert path.read_bytes() == before
    LabelStore(empty, create=True).close()  # asked to create one: it does
    LabelStore(empty).close()
