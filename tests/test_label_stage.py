"""The `label` pipeline stage: candidates from the model so far, labelled by a judge or by people
(the pipeline waits, and resumes where it stopped), exported into the stages after it."""

import json
import socket
import stat
import threading
import time
import uuid

import pytest

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.config.loading import load_pipeline
from rlhfkit.errors import ConfigError
from rlhfkit.labeling.store import LabelStore

JUDGE = """
def longer(prompts, completions, **columns):
    return [float(len(completion)) for completion in completions]
"""


@pytest.fixture()
def loop_tree(tmp_path, tiny_model, sft_rows):
    (tmp_path / "judges.py").write_text(JUDGE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows[:6]])
    small = {"max_steps": 1, "batch_size": 2, "trackers": []}
    return {
        "pipeline": {
            "output_dir": str(tmp_path / "run"),
            "model": str(tiny_model),
            "stages": ["sft", "label", "reward", "dpo"],
        },
        "sft": {
            "data": {"path": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows))},
            "train": small,
            "generation": {"num_prompts": 0},
        },
        "label": {
            "prompts": str(prompts),
            "sampling": {"max_new_tokens": 8, "temperature": 1.0},
            "labeler": "judge",
            "judge": {"function": f"{tmp_path / 'judges.py'}:longer"},
        },
        "reward": {"train": small, "data": {"eval_fraction": 0.0}},
        "dpo": {"train": small, "data": {"eval_fraction": 0.0}, "generation": {"num_prompts": 0}},
    }


def test_a_judge_labelled_pipeline_trains_on_the_labels_and_never_labels_twice(loop_tree, tmp_path, capsys):
    path = tmp_path / "loop.yaml"
    path.write_text(json.dumps(loop_tree))
    _, configs = load_pipeline(str(path))
    run = tmp_path / "run"
    assert configs["label"].model == str(run / "sft") and configs["label"].output_dir == str(run / "label")
    assert configs["reward"].data.path == configs["dpo"].data.path == str(run / "label" / "export.jsonl")
    assert main(["pipeline", str(path)]) == 0
    rows = [json.loads(line) for line in (run / "label" / "export.jsonl").read_text().splitlines()]
    assert rows and all(len(row["chosen"]) > len(row["rejected"]) for row in rows)  # the judge's choice
    metrics = json.loads((run / "label" / "metrics.json").read_text())
    assert metrics["exported"] == len(rows) and metrics["labeler"] == "judge"
    assert (
        capsys.readouterr().out.count(f"data: {len(rows)} rows; {len(rows)} train / 0 eval pairs") == 2
    )  # reward, dpo
    # Run again after a stop inside the label stage: the candidates and the judge's labels are kept, not redone.
    store = LabelStore(run / "label" / "labels.db")
    before = [store.pair(i) for i in store.pair_ids()]
    judged = store.connection.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    store.close()
    (run / "label" / "run.json").unlink()  # as if the stage had been stopped before it finished
    assert main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    assert "already generated" in out and "has already labelled every task, kept" in out
    store = LabelStore(run / "label" / "labels.db")
    assert [store.pair(i) for i in store.pair_ids()] == before
    assert store.connection.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == judged


def test_single_answers_feed_kto_and_a_thumbs_reward_model(loop_tree, tmp_path):
    loop_tree["pipeline"]["stages"] = ["sft", "label", "reward", "dpo", "kto"]
    loop_tree["label"].update(kind="single", responses=2)
    loop_tree["label"]["judge"]["threshold"] = 12.0  # longer than 12 characters: 👍
    loop_tree["kto"] = {
        "train": loop_tree["dpo"]["train"],
        "data": {"eval_fraction": 0.0},
        "generation": {"num_prompts": 0},
    }
    _, configs = load_pipeline(loop_tree)
    run = tmp_path / "run"
    assert configs["reward"].data.path == configs["kto"].data.path == str(run / "label" / "export.jsonl")
    assert configs["dpo"].data.path == str(run / "label" / "pairs.jsonl")
    from rlhfkit import api

    result = api.pipeline(loop_tree)
    rows = [json.loads(line) for line in (run / "label" / "export.jsonl").read_text().splitlines()]
    assert all(row["label"] == (len(row["completion"]) > 12) for row in rows)
    saved = json.loads((result["reward"].path / "rlhfkit_model.json").read_text())
    assert saved["objective"] == "binary"  # the reward model read the thumbs
    assert "train/label_accuracy" in (run / "kto" / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"labeler": "judge"}, "labeler judge: set one of judge.reward_model, judge.function or judge.llm"),
        ({"judge": {"function": "a:b", "llm": "x/y"}}, "give one judge, not function and llm"),
        ({"labeler": "people", "people": {"annotators": []}}, "name at least one annotator"),
        ({"labeler": "people", "people": {"annotators": ["ann", "ann"]}}, "listed twice"),
        ({"prompts": "missing.jsonl"}, "data file does not exist: missing.jsonl"),
    ],
)
def test_label_settings_are_checked_before_anything_runs(section, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline({"pipeline": {"stages": ["label"]}, "label": section})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scripted_annotator(run_dir, port, how_many, stop):
    """Waits for the page and the tokens, then labels up to `how_many` tasks through the API."""
    import httpx

    tokens_file = run_dir / "label" / "tokens.json"
    while not tokens_file.exists() and not stop.is_set():
        time.sleep(0.05)
    token = json.loads(tokens_file.read_text())["ann"]
    url = f"http://127.0.0.1:{port}"
    labelled = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        while labelled < how_many and not stop.is_set():
            try:
                task = client.get("/api/next").json()
            except httpx.TransportError:  # the page is not up yet
                time.sleep(0.05)
                continue
            if task["pair_id"] is None:
                break
            body = {"pair_id": task["pair_id"], "choice": "left", "submission_id": uuid.uuid4().hex}
            assert client.post("/api/judgements", json=body).status_code == 200
            labelled += 1


def test_a_pipeline_waiting_for_people_stops_and_resumes_without_losing_a_label(loop_tree, tmp_path, capsys):
    port = free_port()
    loop_tree["label"] = {
        "prompts": loop_tree["label"]["prompts"],
        "sampling": loop_tree["label"]["sampling"],
        "labeler": "people",
        "people": {"annotators": ["ann"], "port": port, "wait_minutes": 0.05, "poll_seconds": 0.1},
    }
    path = tmp_path / "people.yaml"
    path.write_text(json.dumps(loop_tree))
    run = tmp_path / "run"

    # First run: the annotator labels two pairs, then the wait ends; the pipeline stops, naming the count.
    stop = threading.Event()
    annotator = threading.Thread(target=scripted_annotator, args=(run, port, 2, stop))
    annotator.start()
    assert main(["pipeline", str(path)]) == 2
    stop.set()
    annotator.join()
    captured = capsys.readouterr()
    assert f"the labeling page is on http://127.0.0.1:{port}/" in captured.out
    assert "2 of" in captured.err and "the labels are kept — re-run the pipeline" in captured.err
    tokens_file = run / "label" / "tokens.json"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    store = LabelStore(run / "label" / "labels.db")
    candidates, total = [store.pair(i) for i in store.pair_ids()], len(store.pair_ids())
    assert len(store.current_judgements()) == 2 and total > 2
    store.close()
    assert not (run / "reward").exists()  # nothing after the label stage ran

    # Second run: the same candidates and both labels are still there; the rest get labelled; on it goes.
    loop_tree["label"]["people"]["wait_minutes"] = 2
    path.write_text(json.dumps(loop_tree))
    stop = threading.Event()
    annotator = threading.Thread(target=scripted_annotator, args=(run, port, total, stop))
    annotator.start()
    assert main(["pipeline", str(path)]) == 0
    stop.set()
    annotator.join()
    store = LabelStore(run / "label" / "labels.db")
    assert [store.pair(i) for i in store.pair_ids()] == candidates
    assert len(store.current_judgements()) == total and store.annotator_names() == ["ann"]
    assert json.loads(tokens_file.read_text()).keys() == {"ann"}  # the same annotator, the same token
    assert (run / "dpo" / "final").is_dir()
    assert json.loads((run / "label" / "metrics.json").read_text())["labelled"] == total


def test_rounds_label_the_latest_policy_and_train_from_it(loop_tree, tmp_path, capsys):
    loop_tree["pipeline"].update(stages=["sft", "label", "reward", "dpo", "evaluate"], rounds=2)
    loop_tree["evaluate"] = {"num_prompts": 2, "samples_per_prompt": 2, "sampling": {"max_new_tokens": 4}}
    _, configs = load_pipeline(loop_tree)
    run = tmp_path / "run"
    assert list(configs) == ["sft", "label", "reward", "dpo", "label@2", "reward@2", "dpo@2", "evaluate"]
    assert configs["label@2"].model == str(run / "dpo")  # round 2 labels round 1's policy ...
    assert configs["dpo@2"].model.name_or_path == str(run / "dpo")  # ... and trains on from it
    assert configs["reward@2"].model.name_or_path == str(run / "sft")  # a fresh reward model on round 2's labels
    assert (
        configs["dpo@2"].data.path == configs["reward@2"].data.path == str(run / "round-2" / "label" / "export.jsonl")
    )
    assert configs["dpo@2"].eval.reward_model == str(run / "round-2" / "reward")
    assert configs["evaluate"].models == {
        "base": loop_tree["pipeline"]["model"],
        "sft": str(run / "sft"),
        "dpo": str(run / "dpo"),
        "dpo@2": str(run / "round-2" / "dpo"),
    }
    from rlhfkit import api

    result = api.pipeline(loop_tree)
    assert result["dpo@2"].path == run / "round-2" / "dpo" / "final" and result["dpo@2"].path.is_dir()
    assert (run / "round-2" / "label" / "labels.db").is_file()
    report = (run / "report.md").read_text()
    rounds = report.split("## Rounds")[1].split("##")[0]
    assert "| 1 | dpo |" in rounds and "| 2 | dpo@2 |" in rounds
    assert any(verdict in rounds for verdict in ("dpo@2 beat dpo", "dpo@2 was worse than dpo", "dpo@2 was not clearly"))
    capsys.readouterr()
    assert main(["pipeline", "--set", "pipeline.rounds=2", str(_write(tmp_path, loop_tree))]) == 0
    assert capsys.readouterr().out.count("skipped") == 8  # every run of both rounds is complete
    with pytest.raises(ConfigError, match="rounds repeat sample -> label -> train"):
        load_pipeline({"pipeline": {"stages": ["sft", "dpo"], "rounds": 2}})


def _write(tmp_path, tree):
    path = tmp_path / "rounds.yaml"
    path.write_text(json.dumps(tree))
    return path


def test_the_loop_example_configs_run_on_the_tiny_model(tiny_model, tiny_reward_model, tmp_path):
    """configs/examples/loop_tutor_judge.yaml end to end, with the quickstart's models swapped for
    the tiny ones and every budget cut; loop_tutor_people.yaml validated (it waits for people)."""
    from pathlib import Path

    from rlhfkit import api

    examples = Path(__file__).resolve().parents[1] / "configs" / "examples"
    run = tmp_path / "loop"
    overrides = [
        f"pipeline.output_dir={run}",
        f"pipeline.model={tiny_model}",
        f"label.judge.reward_model={tiny_reward_model}",
        "label.judge.tie_margin=0",  # the tiny reward model's scores differ by less than the example's 0.05
        "label.num_prompts=4",
        "label.sampling.max_new_tokens=6",
        "reward.train.max_steps=1",
        "dpo.train.max_steps=1",
        f"evaluate.models={{sft: {tiny_model}, dpo: {run / 'dpo'}, dpo@2: {run / 'round-2' / 'dpo'}}}",
        f"evaluate.reward_model={tiny_reward_model}",
        "evaluate.num_prompts=2",
        "evaluate.sampling.max_new_tokens=4",
    ]
    result = api.pipeline(examples / "loop_tutor_judge.yaml", overrides)
    assert list(result.stages) == ["label", "reward", "dpo", "label@2", "reward@2", "dpo@2", "evaluate"]
    assert set(result["evaluate"].metrics["models"]) == {"sft", "dpo", "dpo@2"}
    assert "## Rounds" in (run / "report.md").read_text()
    _, configs = load_pipeline(
        str(examples / "loop_tutor_people.yaml"), [f"pipeline.model={tiny_model}", f"pipeline.output_dir={run}-people"]
    )
    assert configs["label"].labeler == "people" and configs["label"].kind == "single"
    assert (
        configs["kto"].data.path == configs["reward"].data.path == str(Path(f"{run}-people") / "label" / "export.jsonl")
    )


def test_an_empty_export_is_named_and_a_judge_with_new_settings_labels_again(loop_tree, tmp_path, capsys):
    loop_tree["pipeline"]["stages"] = ["sft", "label"]
    loop_tree["label"]["judge"]["tie_margin"] = 1e9  # every pair a tie
    assert main(["pipeline", str(_write(tmp_path, loop_tree))]) == 2
    assert (
        "no labels to export (6 tasks labelled; 0 with too few votes, 6 without a majority)" in capsys.readouterr().err
    )
    store = LabelStore(tmp_path / "run" / "label" / "labels.db")
    assert {j.choice for j in store.current_judgements(kinds=("judge",))} == {"tie"}
    store.close()
    loop_tree["label"]["judge"]["tie_margin"] = 0.0  # run again with a margin that suits the scores
    assert main(["pipeline", str(_write(tmp_path, loop_tree))]) == 0
    store = LabelStore(tmp_path / "run" / "label" / "labels.db")
    histories = [store.history(pair_id, 1) for pair_id in store.pair_ids()]  # the judge is annotator 1
    assert all(len(h) == 2 and h[0] == "tie" for h in histories)  # the same candidates, labelled again
    assert {h[1] for h in histories} != {"tie"} and (tmp_path / "run" / "label" / "export.jsonl").read_text()
