"""`rlhfkit label` as a pipeline stage: the feedback-collection step of RLHF.

1. **Candidates**: the model so far (in a pipeline, the last policy stage's) answers the prompts,
   as pairs or as single answers (`kind`), into `labels.db` in the run directory — once: a
   re-run keeps the store and every label in it.
2. **Labels**: a judge labels every task and the stage goes on (`labeler: judge`), or people do
   (`labeler: people`): the labeling page is served, the URL and each annotator's sign-in token
   printed (tokens also kept in `tokens.json`, readable by its owner only), and the stage waits,
   showing progress, until every task has `required` labels. Stopping the pipeline, or
   `people.wait_minutes` passing, stops the page; labels given so far stay in the store, and
   re-running the pipeline serves the page again where it stopped.
3. **Export**: majority labels into `export.jsonl` — preference pairs (pairwise), or 👍/👎 rows
   plus the liked × disliked pairs of each prompt in `pairs.jsonl` (single) — which the stages
   after it train on; `metrics.json` holds the counts and the agreement.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from rlhfkit.config import LabelConfig, label_export_paths
from rlhfkit.engine import RunDir
from rlhfkit.errors import UserError
from rlhfkit.files import write_json_atomically, write_text_atomically
from rlhfkit.labeling import commands
from rlhfkit.labeling.server import BackgroundServer
from rlhfkit.labeling.store import LabelStore

STAGE = "label"
STORE, TOKENS = "labels.db", "tokens.json"


def generate_once(config: LabelConfig, store_path: Path) -> int:
    """Sample the candidates unless an earlier run did (the store records it); returns the tasks."""
    if store_path.exists():
        store = LabelStore(store_path)
        done, kind = store.setting("candidates") == "generated", store.kind
        tasks = len(store.pair_ids() if kind == "pairwise" else store.answer_ids())
        store.close()
        if done and kind == config.kind:
            print(f"label: {tasks} {kind} tasks already generated in {store_path}, kept with their labels")
            return tasks
        if done:
            raise UserError(f"{store_path} holds {kind} tasks but label.kind is {config.kind}; use another output_dir")
        for suffix in ("", "-wal", "-shm"):  # cut short while sampling: no labels can be in it yet
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    commands.generate_candidates(
        str(store_path),
        config.model,
        config.prompts,
        config.responses,
        config.num_prompts,
        config.sampling,
        config.required,
        config.seed,
        config.kind,
        config.sampling.engine,
    )
    store = LabelStore(store_path)
    store.set_setting("candidates", "generated")
    tasks = len(store.pair_ids() if store.kind == "pairwise" else store.answer_ids())
    store.close()
    if tasks == 0:
        raise UserError(f"label: no candidates to label (every prompt of {config.prompts} was skipped)")
    return tasks


def judge_once(config: LabelConfig, store_path: Path) -> str:
    """Label every task with the configured judge, unless it has already with the same settings
    (a re-run); its name. Changed settings (a threshold, a tie margin) label again: the new labels
    become the current ones, the earlier stay as history."""
    judge = config.judge
    reference = judge.reward_model or judge.function or judge.llm
    kind = "reward-model" if judge.reward_model else "function" if judge.function else "llm"
    name = judge.name or f"{kind}:{reference}"
    settings = json.dumps(judge.model_dump(mode="json"), sort_keys=True)
    store = LabelStore(store_path)
    done = store.labelled_tasks(kinds=("judge",)) if name in store.annotator_names("judge") else (0, 1)
    same = store.setting(f"judge:{name}") == settings
    store.close()
    if done[0] == done[1] and same:
        print(f"label: {name} has already labelled every task, kept")
        return name
    if judge.llm:
        tie_margin = 0.05 if judge.tie_margin is None else judge.tie_margin
        threshold = 0.5 if judge.threshold is None else judge.threshold
        counts = commands.judge_with_llm(str(store_path), judge.llm, tie_margin, name, threshold)
    else:
        label_by = commands.judge_with_function if judge.function else commands.judge_with_reward_model
        counts = label_by(str(store_path), reference, judge.tie_margin or 0.0, name, judge.threshold or 0.0)
    store = LabelStore(store_path)
    store.set_setting(f"judge:{name}", settings)
    store.close()
    print(f"label: {name} labelled {sum(counts.values())} tasks: {counts}")
    warning = commands.one_sided_warning(counts) if config.kind == "single" else None
    if warning:
        print(warning)
    return name


def annotator_tokens(config: LabelConfig, store_path: Path, tokens_path: Path) -> dict[str, str]:
    """Each annotator's sign-in token: created once, kept in tokens.json (mode 600) for re-runs."""
    tokens = json.loads(tokens_path.read_text(encoding="utf-8")) if tokens_path.exists() else {}
    store = LabelStore(store_path)
    try:
        for name in config.people.annotators:
            if name not in tokens:
                if name in store.annotator_names():
                    raise UserError(f"label: annotator {name!r} exists in {store_path} but not in {tokens_path}")
                tokens[name] = store.add_annotator(name)
    finally:
        store.close()
    write_text_atomically(tokens_path, json.dumps(tokens, indent=2) + "\n")
    os.chmod(tokens_path, 0o600)
    return tokens


def wait_for_people(config: LabelConfig, store_path: Path, tokens_path: Path) -> None:
    """Serve the page and wait until every task has its required human labels (or the wait ends)."""
    people = config.people
    tokens = annotator_tokens(config, store_path, tokens_path)

    def labelled() -> tuple[int, int]:
        store = LabelStore(store_path)
        try:
            return store.labelled_tasks(kinds=("human",))
        finally:
            store.close()

    done, total = labelled()
    if done == total:
        print(f"label: all {total} tasks have their required labels")
        return
    deadline = time.monotonic() + people.wait_minutes * 60 if people.wait_minutes else None
    with BackgroundServer(store_path, people.host, people.port) as server:
        print(f"label: the labeling page is on {server.url} — sign in with a token:")
        for name, token in tokens.items():
            print(f"  {name}: {token}")
        print(f"label: waiting for {config.required} label(s) on each of {total} tasks (tokens also in {tokens_path})")
        with tqdm(total=total, initial=done, desc="label", unit="task", dynamic_ncols=True) as bar:
            while done < total:
                if deadline is not None and time.monotonic() > deadline:
                    raise UserError(
                        f"label: {done} of {total} tasks have their required labels after {people.wait_minutes:g} "
                        "min; the labels are kept — re-run the pipeline to serve the page again and go on"
                    )
                time.sleep(people.poll_seconds)
                now, _ = labelled()
                bar.update(now - done)
                done = now


def run(config: LabelConfig, resume: bool = False) -> dict:
    run_dir = RunDir.start_untrained(config.output_dir, STAGE, config)
    store_path = run_dir.root / STORE

    # Candidates from the model so far, then labels from the judge or from people.
    tasks = generate_once(config, store_path)
    if config.labeler == "judge":
        sources, annotators = ("judge",), [judge_once(config, store_path)]
    else:
        wait_for_people(config, store_path, run_dir.root / TOKENS)
        sources, annotators = ("human",), None

    # Export what the next stages train on.
    paths = label_export_paths(run_dir.root, config.kind)
    if config.kind == "single":
        stats = commands.export_feedback(
            str(store_path), str(paths["feedback"]), sources, annotators, pairs_output=str(paths["preferences"])
        )
        print(
            f"label: {stats['exported']} labelled answers ({stats['desirable']} 👍, {stats['undesirable']} 👎), "
            f"{stats['derived_pairs']} derived pairs"
        )
    else:
        stats = commands.export_preferences(str(store_path), str(paths["preferences"]), sources, annotators)
        print(f"label: {stats['exported']} preference pairs ({stats['no_majority']} without a majority)")
    if stats["exported"] == 0:
        why = "ties" if config.kind == "pairwise" and config.labeler == "judge" else "votes"
        raise UserError(
            f"label: no labels to export ({stats['labelled']} tasks labelled; {stats['too_few_votes']} with too few "
            f"votes, {stats['no_majority']} without a majority); with a judge, all {why} usually mean its tie "
            "margin is wider than its score differences (judge.tie_margin)"
        )
    metrics = {"tasks": tasks, "labeler": config.labeler, "kind": config.kind, **stats}
    write_json_atomically(run_dir.root / "metrics.json", metrics)
    run_dir.write_marker(STAGE, "complete")
    return metrics
