"""A reward model from labels: sample answer pairs into a labeling store, label them, export, train.

People label on the page `rlhfkit label serve labels.db` serves; here a scripted annotator stands
in for them (it prefers the shorter answer), so the example runs unattended.

    python examples/reward_from_labels.py          # the embedded SmolLM2-135M-Instruct, ~3 minutes
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from common import options, quiet_training

import rlhfkit
from rlhfkit.config import SamplingSettings
from rlhfkit.labeling.commands import export_preferences, generate_candidates
from rlhfkit.labeling.store import LabelStore


def label_shorter_answer(store_path: Path, annotator: str) -> int:
    """Submit one judgement per pair, as the labeling page would: the shorter answer wins."""
    store = LabelStore(store_path)
    token = store.add_annotator(annotator)  # what `rlhfkit label annotator` prints for a person
    person, _ = store.annotator_for_token(token)  # what the page does at sign-in
    labelled = 0
    for pair_id in store.pair_ids():
        pair = store.pair(pair_id)
        choice = "a" if len(pair.response_a) <= len(pair.response_b) else "b"
        labelled += store.submit(pair_id, person, choice, left="a", submission_id=uuid.uuid4().hex)
    store.close()
    return labelled


def main(argv: Sequence[str] | None = None) -> rlhfkit.StageResult:
    args = options(__doc__.splitlines()[0], "reward", steps=30, argv=argv)
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    store, export = root / "labels.db", root / "prefs.jsonl"
    if not export.exists():
        sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0)
        generate_candidates(str(store), args.model, "builtin:tutor-sft", limit=40, sampling=sampling)
        print(f"{label_shorter_answer(store, 'scripted-annotator')} pairs labelled")
        stats = export_preferences(str(store), str(export))
        print(f"{stats['exported']} preference pairs exported to {export}")
    run = rlhfkit.reward(
        model=args.model,
        data={"path": export, "eval_fraction": 0.25},
        output_dir=root / "model",
        train={**quiet_training(args.steps), "batch_size": 4, "lr": 1e-4},
    )
    before, after = run.metrics["before"], run.metrics["after"]
    print(f"held-out pair accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    short, long = "Light scatters.", "Well, you see, light is a thing that, when it goes, it scatters, sort of, a lot."
    scores = rlhfkit.score(run, ["Why is the sky blue?"] * 2, [short, long])
    print(f"scores: short {scores[0]:.3f}, long {scores[1]:.3f}")
    return run


if __name__ == "__main__":
    main()
