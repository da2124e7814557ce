"""Single-answer labeling: 👍/👎 with a 1-5 rating — the store, agreement, judges, export, the page."""

import json
import sqlite3
import uuid

import pytest

from conftest import QUESTIONS, write_jsonl
from rlhfkit.cli import main
from rlhfkit.errors import UserError
from rlhfkit.labeling.agreement import by_answer, fleiss_kappa, krippendorff_alpha_interval, majority_thumb
from rlhfkit.labeling.commands import export_feedback, one_sided_warning
from rlhfkit.labeling.schema import SCHEMA_VERSION, THUMBS
from rlhfkit.labeling.store import LabelStore, SubmissionConflict, WrongTaskKind

SCRIPT = "<script>document.title='pwned'</script>Hello"


def single_store(path, required=1):
    """Four questions, two answers each (a kind one and a curt one): 8 answers to label."""
    store = LabelStore(path, create=True)
    store.set_kind("single")
    for index, question in enumerate(QUESTIONS[:4]):
        kind = SCRIPT if index == 0 else f"A kind answer {index}."
        store.add_answers(({"role": "user", "content": question},), [("m", kind), ("m", f"Go away {index}.")], required)
    return store


def test_a_store_labels_one_kind_of_task(tmp_path):
    store = single_store(tmp_path / "thumbs.db")
    assert store.kind == "single" and store.answer_ids() == list(range(1, 9))
    answer = store.answer(2)
    assert answer.prompt == ({"role": "user", "content": QUESTIONS[0]},) and answer.response == "Go away 0."
    with pytest.raises(UserError, match="labels single tasks .8 of them.; use another store for pairwise"):
        store.set_kind("pairwise")
    with pytest.raises(WrongTaskKind, match="labels single tasks, not pairwise"):
        store.add_candidates(answer.prompt, [("m", "x"), ("m", "y")])
    pairwise = LabelStore(tmp_path / "pairs.db", create=True)
    assert pairwise.kind == "pairwise"  # the default, and what every earlier store holds
    pairwise.add_candidates(answer.prompt, [("m", "x"), ("m", "y")])
    with pytest.raises(UserError, match="labels pairwise tasks"):
        pairwise.set_kind("single")
    with pytest.raises(WrongTaskKind):
        pairwise.submit_verdict(1, 1, "up", "s-000001")


def test_verdicts_are_idempotent_replace_earlier_ones_and_keep_history(tmp_path):
    store = single_store(tmp_path / "thumbs.db")
    store.add_annotator("alice")
    assert store.submit_verdict(1, 1, "up", "sub-0001", rating=4, comment="clear") is True
    assert store.submit_verdict(1, 1, "up", "sub-0001", rating=4, comment="clear") is False  # a retry
    with pytest.raises(SubmissionConflict):
        store.submit_verdict(1, 1, "down", "sub-0001")
    assert store.submit_verdict(1, 1, "down", "sub-0002", rating=2) is True  # a change of mind
    with pytest.raises(KeyError):
        store.submit_verdict(99, 1, "up", "sub-0003")
    for bad in ({"label": "meh"}, {"label": "up", "rating": 6}, {"label": "up", "rating": 0}):
        with pytest.raises(ValueError):
            store.submit_verdict(2, 1, submission_id="sub-0004", **bad)
    (current,) = store.current_verdicts()
    assert (current.answer_id, current.label, current.rating) == (1, "down", 2)
    rows = store.connection.execute("SELECT label, current FROM verdicts ORDER BY id").fetchall()
    assert [tuple(row) for row in rows] == [("up", None), ("down", 1)]
    assert store.progress(1) == (1, 8) and store.next_task_id(1) == 2
    store.record_judge_verdicts("rm", [(1, "up"), (2, "down")])
    assert [v.annotator for v in store.current_verdicts(kinds=("judge",))] == ["rm", "rm"]


def test_a_version_2_store_opens_as_pairwise_and_gains_the_single_answer_tables(tmp_path):
    path = tmp_path / "v2.db"
    LabelStore(path, create=True).close()
    old = sqlite3.connect(path)
    old.executescript("DROP TABLE verdicts; DROP TABLE answers; DROP TABLE settings; PRAGMA user_version = 2;")
    old.close()
    store = LabelStore(path)
    assert store.kind == "pairwise" and store.answer_ids() == []
    assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_majority_thumbs_and_agreement_by_hand():
    assert majority_thumb(["up", "up", "down"]) == "up" and majority_thumb(["up", "down"]) is None
    # Krippendorff's α (interval), units [1, 1] and [3, 5], n = 4 pairable values:
    # D_o = (1/4)·[(0 + 0)/1 + ((3−5)² + (5−3)²)/1] = 2
    # D_e = Σ over ordered pairs of all values [1, 1, 3, 5] of (c − k)² / (4·3) = 2·(0+4+16+4+16+4) / 12 = 7.333
    # α = 1 − 2 / 7.333 = 0.727273
    assert krippendorff_alpha_interval([[1, 1], [3, 5], [4]]) == pytest.approx(0.727273, abs=1e-6)
    assert krippendorff_alpha_interval([[2, 2], [5, 5]]) == 1.0
    # Fleiss' κ over thumbs: 2 items, 2 raters, one agreeing pair and one split:
    # P̄ = (1 + 0)/2 = 0.5; p_up = 3/4, p_down = 1/4, P̄_e = 0.625; κ = (0.5 − 0.625)/(1 − 0.625) = −1/3
    assert fleiss_kappa([{"up": 2}, {"up": 1, "down": 1}], THUMBS) == pytest.approx(-1 / 3)


def test_export_writes_majority_thumbs_mean_ratings_and_derived_pairs(tmp_path):
    store = single_store(tmp_path / "thumbs.db")
    for name in ("alice", "bob"):
        store.add_annotator(name)
    votes = {  # answer: (alice's label, rating), (bob's label, rating)
        1: (("up", 5), ("up", 4)),
        2: (("down", 1), ("down", None)),
        3: (("up", None), ("down", 2)),  # split: no label
        4: (("down", 2), ("down", 1)),
        5: (("up", 3), None),  # one vote
    }
    for answer_id, pair in votes.items():
        for annotator_id, vote in enumerate(pair, start=1):
            if vote:
                store.submit_verdict(answer_id, annotator_id, vote[0], uuid.uuid4().hex, rating=vote[1])
    store.close()
    stats = export_feedback(
        str(tmp_path / "thumbs.db"), str(tmp_path / "out.jsonl"), pairs_output=str(tmp_path / "p.jsonl")
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["answer_id"], r["label"], r.get("rating")) for r in rows] == [
        (1, True, 4.5),
        (2, False, 1.0),
        (4, False, 1.5),
        (5, True, 3.0),
    ]
    assert rows[0]["completion"] == SCRIPT and rows[0]["prompt"] == [{"role": "user", "content": QUESTIONS[0]}]
    assert stats["no_majority"] == 1 and stats["desirable"] == 2 and stats["undesirable"] == 2
    pairs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(SCRIPT, "Go away 0.")]  # question 0 has 👍 and 👎
    assert stats["derived_pairs"] == 1
    # κ over the four answers both labelled (3 agreeing, 1 split); α over the three rated twice
    assert stats["agreement"]["cohens_kappa"]["alice vs bob"]["items"] == 4
    assert stats["agreement"]["ratings_alpha_interval"] == pytest.approx(
        krippendorff_alpha_interval([[5, 4], [2, 1]]), abs=1e-9
    )
    two_votes = export_feedback(str(tmp_path / "thumbs.db"), str(tmp_path / "two.jsonl"), min_votes=2)
    assert two_votes["exported"] == 3 and two_votes["too_few_votes"] == 1
    thumbs, ratings = by_answer(LabelStore(tmp_path / "thumbs.db").current_verdicts())
    assert thumbs[3] == {"alice": "up", "bob": "down"} and ratings[1] == {"alice": 5, "bob": 4}


def test_a_judge_that_labels_everything_one_way_is_named():
    assert one_sided_warning({"up": 0, "down": 8}) == (
        "warning: the judge labelled every answer the same way (0 👍, 8 👎); its threshold may not suit its scores "
        "(--threshold), and KTO or a thumbs reward model need both labels"
    )
    assert one_sided_warning({"up": 3, "down": 5}) is None


def test_generate_judge_export_and_train_kto_from_the_cli(tmp_path, tiny_model, tiny_reward_model, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS[:4]])
    store = tmp_path / "thumbs.db"
    generate = ["label", "generate", str(store), "--model", str(tiny_model), "--prompts", str(prompts)]
    sampling = ["--max-new-tokens", "8", "--temperature", "1.0"]
    assert main([*generate, "--kind", "single", *sampling]) == 0
    assert "answers added" in capsys.readouterr().out
    count = len(LabelStore(store).answer_ids())
    assert 4 <= count <= 8
    assert main([*generate, *sampling]) == 2  # a pairwise generation into a single-answer store
    assert "use another store for pairwise tasks" in capsys.readouterr().err
    # The tiny reward model's scores sit on one side of a threshold far away: every answer one way, named.
    assert main(["label", "judge", str(store), "--reward-model", str(tiny_reward_model), "--threshold", "1e9"]) == 0
    captured = capsys.readouterr()
    assert f"judged {count} answers: 👍 0, 👎 {count}" in captured.out and "same way" in captured.err
    # A median threshold splits them.
    from rlhfkit.rewards import RewardModelScorer

    answers = [LabelStore(store).answer(i) for i in LabelStore(store).answer_ids()]
    scores = sorted(
        RewardModelScorer(str(tiny_reward_model)).score([a.prompt for a in answers], [a.response for a in answers])
    )
    middle = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    assert (
        main(
            [
                "label",
                "judge",
                str(store),
                "--reward-model",
                str(tiny_reward_model),
                "--threshold",
                str(middle),
                "--name",
                "rm",
            ]
        )
        == 0
    )
    export = tmp_path / "thumbs.jsonl"
    assert main(["label", "export", str(store), str(export), "--from", "judge", "--annotator", "rm"]) == 0
    assert f"{count} labelled answers ({count // 2} 👍, {count - count // 2} 👎)" in capsys.readouterr().out
    overrides = [f"model.name_or_path={tiny_model}", f"data.path={export}", f"train.output_dir={tmp_path / 'kto'}"]
    overrides += ["train.max_steps=1", "train.batch_size=2", "train.trackers=[]", "generation.num_prompts=0"]
    assert main(["kto", *[arg for setting in overrides for arg in ("--set", setting)]]) == 0
    overrides[2] = f"train.output_dir={tmp_path / 'thumbs-rm'}"  # a thumbs reward model on the same export
    assert main(["reward", *[arg for setting in overrides[:-1] for arg in ("--set", setting)]]) == 0
    assert json.loads((tmp_path / "thumbs-rm" / "final" / "rlhfkit_model.json").read_text())["objective"] == "binary"
    assert main(["label", "export", str(store), str(tmp_path / "x.jsonl"), "--pairs", str(tmp_path / "p.jsonl")]) == 0
    pairwise = tmp_path / "pairs.db"
    LabelStore(pairwise, create=True).close()
    assert (
        main(["label", "export", str(pairwise), str(tmp_path / "y.jsonl"), "--pairs", str(tmp_path / "q.jsonl")]) == 2
    )


def test_the_llm_judge_asks_yes_or_no_about_a_single_answer(tiny_model, tmp_path, capsys):
    import torch

    from rlhfkit.labeling.commands import llm_approvals
    from rlhfkit.models import ModelSettings, load_causal_lm, load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(str(tiny_model)))
    model = load_causal_lm(resolve(str(tiny_model)), ModelSettings(), torch.float32).eval()
    prompts, answers = ["Why is the sky blue?", "What is the sun?"], ["Light scatters.", "Go away, it is hot."]
    approvals = llm_approvals(model, tokenizer, prompts, answers)
    assert len(approvals) == 2 and all(0 < p < 1 for p in approvals)
    assert llm_approvals(model, tokenizer, prompts[1:], answers[1:]) == pytest.approx(approvals[1:], abs=1e-5)
    single_store(tmp_path / "thumbs.db").close()
    # A threshold of 0 makes every answer 👍: the judge is warned about, and its labels are stored.
    assert main(["label", "judge", str(tmp_path / "thumbs.db"), "--llm", str(tiny_model), "--threshold", "0"]) == 0
    captured = capsys.readouterr()
    assert "judged 8 answers: 👍 8, 👎 0" in captured.out and "same way" in captured.err
    assert {v.annotator for v in LabelStore(tmp_path / "thumbs.db").current_verdicts(kinds=("judge",))} == {
        f"llm:{tiny_model}"
    }


# ---- the server and the page ------------------------------------------------------------

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_labeling_server import auth, browser_page, in_parallel, needs_chromium  # noqa: E402

from rlhfkit.labeling.server import create_app  # noqa: E402


def verdict(answer_id, label, **extra):
    return {"answer_id": answer_id, "label": label, "submission_id": uuid.uuid4().hex, **extra}


@pytest.fixture()
def store_with_people(tmp_path):
    path = tmp_path / "thumbs.db"
    store = single_store(path)
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    store.close()
    return path, tokens


def test_the_api_serves_single_answers_to_their_annotator_only(store_with_people):
    path, tokens = store_with_people
    client = TestClient(create_app(path))
    alice, bob = auth(tokens["alice"]), auth(tokens["bob"])
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/me", headers=alice).json()["kind"] == "single"
    task = client.get("/api/next", headers=alice).json()
    assert task["answer_id"] == 1 and task["response"] == SCRIPT and task["progress"] == {"done": 0, "total": 8}
    body = verdict(1, "up", rating=5, comment="kind")
    first = client.post("/api/verdicts", json=body, headers=alice)
    again = client.post("/api/verdicts", json=body, headers=alice)
    assert first.json()["stored"] is True and again.json()["stored"] is False and again.json()["progress"]["done"] == 1
    (mine,) = client.get("/api/verdicts", headers=alice).json()
    assert (mine["answer_id"], mine["label"], mine["rating"], mine["comment"]) == (1, "up", 5, "kind")
    assert client.get("/api/verdicts", headers=bob).json() == []
    assert client.get("/api/next", headers=bob).json()["answer_id"] == 2  # answers short of labels first
    conflict = client.post("/api/verdicts", json={**body, "label": "down"}, headers=alice)
    assert conflict.status_code == 409 and body["submission_id"] in conflict.json()["detail"]


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/api/verdicts", verdict(99, "up"), 404),
        ("/api/verdicts", verdict(1, "good"), 422),
        ("/api/verdicts", verdict(1, "up", rating=6), 422),
        ("/api/verdicts", verdict(1, "up", rating=0), 422),
        ("/api/verdicts", verdict(1, "up", rating=2.5), 422),
        ("/api/verdicts", verdict(1, "up", extra=1), 422),
        ("/api/verdicts", verdict(2**63, "up"), 422),
        ("/api/judgements", {"pair_id": 1, "choice": "left", "submission_id": "abcdefgh1"}, 409),  # another kind
    ],
)
def test_bad_verdicts_and_labels_of_the_other_kind_get_4xx(store_with_people, path, body, status):
    store_path, tokens = store_with_people
    client = TestClient(create_app(store_path), raise_server_exceptions=False)
    response = client.post(path, json=body, headers=auth(tokens["alice"]))
    assert response.status_code == status
    if status == 409:
        assert "labels single tasks, not pairwise" in response.json()["detail"]
    assert LabelStore(store_path).current_verdicts() == []


def test_parallel_clients_store_every_verdict_exactly_once(tmp_path):
    path = tmp_path / "thumbs.db"
    store = single_store(path)
    tokens = [store.add_annotator(f"annotator{i}") for i in range(4)]
    store.close()

    def label_everything(client):
        while (task := client.get("/api/next").json())["answer_id"] is not None:
            body = verdict(task["answer_id"], "up" if task["answer_id"] % 2 else "down", rating=3)
            for _ in range(2):  # every submission is sent twice, as a retry would
                assert client.post("/api/verdicts", json=body).status_code == 200

    in_parallel(path, tokens, label_everything)
    verdicts = LabelStore(path).current_verdicts()
    assert len(verdicts) == 4 * 8 and len({(v.answer_id, v.annotator) for v in verdicts}) == 4 * 8


@needs_chromium
def test_thumbs_ratings_and_comments_in_a_real_browser(store_with_people, tmp_path):
    path, tokens = store_with_people
    with browser_page(path) as (url, page):
        page.goto(url)
        page.fill("#token", tokens["alice"])
        page.click("#signin-button")
        page.wait_for_selector("#progress:has-text('0 / 8')")
        assert page.inner_text("#answer") == SCRIPT and page.title() == "rlhfkit labeling"  # text, never run
        assert page.is_hidden("#choose-left") and page.is_visible("#thumbs-up")
        # 1: 👍 by click, rated 5 by click, with a comment
        page.click("button[data-rating='5']")
        page.fill("#comment", "clear and kind")
        page.click("#thumbs-up")
        page.wait_for_selector("#progress:has-text('1 / 8')")
        # 2: rated 1 by key, 👎 by key
        page.wait_for_selector("#thumbs-down:enabled")
        assert page.get_attribute("button[data-rating='5']", "aria-pressed") == "false"  # a new answer, no rating
        page.keyboard.press("1")
        page.keyboard.press("ArrowDown")
        page.wait_for_selector("#progress:has-text('2 / 8')")
        # 3: 👍 by key, no rating (a rating chosen twice is cleared)
        page.wait_for_selector("#thumbs-up:enabled")
        page.keyboard.press("4")
        page.keyboard.press("4")
        page.keyboard.press("ArrowUp")
        page.wait_for_selector("#progress:has-text('3 / 8')")
        page.screenshot(path=str(tmp_path / "thumbs.png"))
    stored = [(v.answer_id, v.label, v.rating, v.comment) for v in LabelStore(path).current_verdicts()]
    assert stored == [(1, "up", 5, "clear and kind"), (2, "down", 1, ""), (3, "up", None, "")]
    stats = export_feedback(str(path), str(tmp_path / "thumbs.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "thumbs.jsonl").read_text().splitlines()]
    assert [(r["answer_id"], r["label"], r.get("rating")) for r in rows] == [
        (1, True, 5.0),
        (2, False, 1.0),
        (3, True, None),
    ]
    assert stats["exported"] == 3 == stats["labelled"]
