"""`rlhfkit label generate | annotator | judge | export`: fill the store, label with an AI judge, export.

Each works on either kind of store (labeling/store.py): pairs of answers, or single answers
labelled 👍 / 👎.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import ValidationError

from rlhfkit.config import ModelSettings, PromptDataSettings, SamplingSettings
from rlhfkit.config.sections import check_answer_engine
from rlhfkit.data.examples import load_examples, prompt_examples
from rlhfkit.data.formatting import render_prompt
from rlhfkit.errors import UserError
from rlhfkit.files import check_output_files, json_text, write_json_atomically, write_text_atomically
from rlhfkit.labeling.agreement import (
    agreement_report,
    by_answer,
    by_pair,
    krippendorff_alpha_interval,
    majority_label,
    majority_thumb,
)
from rlhfkit.labeling.schema import THUMBS, TaskKind
from rlhfkit.labeling.store import LabelStore
from rlhfkit.models import load_causal_lm, load_tokenizer, resolve
from rlhfkit.rollout_copy import answering_loop
from rlhfkit.sampling import sample_rollout

PROMPT_TOKENS = 4096  # a candidate's prompt is kept whole up to this length


def generate_candidates(
    store_path: str,
    model: str,
    prompts_path: str,
    responses: int = 2,
    limit: int | None = None,
    sampling: SamplingSettings | None = None,
    required: int = 1,
    seed: int = 0,
    kind: TaskKind = "pairwise",
    engine: str = "auto",
) -> int:
    """Sample `responses` answers per prompt from `model` and store them as pairs (kind pairwise)
    or as single answers to label 👍/👎 (kind single); returns the tasks added. engine: what
    samples them (`rollout_copy.answering_loop`).

    Identical samples of a prompt are re-drawn up to 3 times; a prompt still without `responses`
    distinct non-empty answers is skipped (and counted): a pair of equal texts teaches nothing,
    and the same answer twice would be labelled twice.
    """
    check_answer_engine(engine)
    if responses < (2 if kind == "pairwise" else 1):
        raise UserError("--responses must be at least 2 (a pair)" if kind == "pairwise" else "--responses must be >= 1")
    try:
        data = PromptDataSettings(path=prompts_path, eval_fraction=0.0)
    except ValidationError as error:
        raise UserError(f"--prompts {prompts_path}: {error.errors()[0]['msg']}") from None
    examples, _, report = load_examples(data, seed, prompt_examples)
    examples = examples[:limit]
    store = LabelStore(store_path, create=True)
    try:
        store.set_kind(kind)  # a store of the other kind is refused before the model loads
    except UserError:
        store.close()
        raise
    sampling = sampling or SamplingSettings(max_new_tokens=128, temperature=0.9)
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    policy = load_causal_lm(source, ModelSettings(), torch.float32).eval()
    texts = [render_prompt(tokenizer, example.prompt, "auto") for example in examples]
    loop = answering_loop(policy, engine, PROMPT_TOKENS + sampling.max_new_tokens)
    print(f"label generate: {len(examples)} prompts ({report.summary()}) x {responses} responses from {model}")
    added = skipped = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        answers: list[list[str]] = [[] for _ in examples]
        pending = list(range(len(examples)))
        for _ in range(4):  # the first draw and up to 3 re-draws of prompts whose answers coincide
            rollout = sample_rollout(
                policy, tokenizer, [texts[i] for i in pending], sampling, responses, PROMPT_TOKENS, decode_loop=loop
            )
            for slot, index in enumerate(pending):
                answers[index] = rollout.completions[slot * responses : (slot + 1) * responses]
            pending = [
                i
                for i in pending
                if len({a.strip() for a in answers[i]}) < responses or not all(a.strip() for a in answers[i])
            ]
            if not pending:
                break
    for index, example in enumerate(examples):
        if index in pending:
            skipped += 1
            continue
        add = store.add_candidates if kind == "pairwise" else store.add_answers
        added += len(add(example.prompt, [(model, text) for text in answers[index]], required))
    store.close()
    if skipped:
        print(f"label generate: {skipped} prompts skipped (no {responses} distinct non-empty answers in 4 draws)")
    return added


def judge_with_scores(
    store_path: str,
    name: str,
    score: Callable[[list, list[str]], list[float]],
    tie_margin: float = 0.0,
    threshold: float = 0.0,
) -> dict[str, int]:
    """Label every task by a scalar score of each answer, score(prompts, answers). A pair: the
    higher-scored response wins unless within tie_margin. A single answer: 👍 when its score is
    above `threshold` (0 suits a reward model trained on thumbs, whose score is the log-odds of a
    👍), else 👎. Returns the counts of each label."""
    store = LabelStore(store_path)
    try:
        if store.kind == "single":
            answers = [store.answer(answer_id) for answer_id in store.answer_ids()]
            scores = score([a.prompt for a in answers], [a.response for a in answers])
            return _record_thumbs(store, name, answers, [s > threshold for s in scores])
        pairs = [store.pair(pair_id) for pair_id in store.pair_ids()]
        scores_a = score([p.prompt for p in pairs], [p.response_a for p in pairs])
        scores_b = score([p.prompt for p in pairs], [p.response_b for p in pairs])
        return _record_verdicts(store, name, pairs, [a - b for a, b in zip(scores_a, scores_b)], tie_margin)
    finally:
        store.close()


def judge_with_reward_model(
    store_path: str, reward_model: str, tie_margin: float = 0.0, name: str | None = None, threshold: float = 0.0
) -> dict[str, int]:
    """judge_with_scores with a reward model's scalar output as the score."""
    from rlhfkit.rewards import RewardModelScorer

    LabelStore(store_path).close()  # a missing store is named before the model loads
    scorer = RewardModelScorer(reward_model)
    return judge_with_scores(store_path, name or f"reward-model:{reward_model}", scorer.score, tie_margin, threshold)


def judge_with_function(
    store_path: str, function: str, tie_margin: float = 0.0, name: str | None = None, threshold: float = 0.0
) -> dict[str, int]:
    """judge_with_scores with a Python reward (`module:function`, the RL stages' signature) as the score."""
    from rlhfkit.config import RewardSourceSettings
    from rlhfkit.rewards import RewardSource

    source = RewardSource(RewardSourceSettings(function=function))

    def score(prompts: list, answers: list[str]) -> list[float]:
        return [float(value) for value in source.raw_scores(prompts, answers, [{} for _ in answers])]

    return judge_with_scores(store_path, name or f"function:{function}", score, tie_margin, threshold)


def _record_verdicts(
    store: LabelStore, judge: str, pairs: Sequence, differences: Sequence[float], tie_margin: float
) -> dict[str, int]:
    """Store a judge's labels: A when its A-over-B difference exceeds tie_margin, B when below −tie_margin, else a tie."""
    choices = ["a" if d > tie_margin else "b" if d < -tie_margin else "tie" for d in differences]
    store.record_judge(judge, [(pair.id, choice) for pair, choice in zip(pairs, choices)])
    return {choice: choices.count(choice) for choice in ("a", "b", "tie")}


def _record_thumbs(store: LabelStore, judge: str, answers: Sequence, liked: Sequence[bool]) -> dict[str, int]:
    """Store a judge's 👍/👎 labels; the counts of each ("up", "down")."""
    labels = ["up" if like else "down" for like in liked]
    store.record_judge_verdicts(judge, [(answer.id, label) for answer, label in zip(answers, labels)])
    return {label: labels.count(label) for label in THUMBS}


def one_sided_warning(counts: dict[str, int]) -> str | None:
    """A warning when a judge labelled every single answer the same way (its threshold, not the
    answers, decided), naming the counts."""
    if sum(counts.values()) > 1 and 0 in (counts["up"], counts["down"]):
        return (
            f"warning: the judge labelled every answer the same way ({counts['up']} 👍, {counts['down']} 👎); "
            "its threshold may not suit its scores (--threshold), and KTO or a thumbs reward model need both labels"
        )
    return None


JUDGE_TEMPLATE = (
    "Two assistants answered the same request. Judge which answer is more helpful, correct and clear.\n\n"
    "Request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
    "Which answer is better? Reply with the single letter A or B."
)


@torch.inference_mode()
def next_word_odds(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    words: tuple[str, str],
    batch_size: int = 8,
    max_length: int = 2048,
) -> list[float]:
    """Per question (asked as one user turn), the judge's next-token probability of the first of
    two answer words against the second (their first tokens), batched with left padding."""
    from rlhfkit.sampling import encode_prompts

    first, second = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words)
    texts = [render_prompt(tokenizer, [{"role": "user", "content": question}], "auto") for question in questions]
    probabilities = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_prompts(tokenizer, texts[start : start + batch_size], max_length)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        probabilities += logits[:, [first, second]].softmax(dim=-1)[:, 0].tolist()
    return probabilities


def llm_preferences(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    batch_size: int = 8,
    max_length: int = 2048,
) -> list[float]:
    """P(first answer better) per item: the judge's next-token probability of "A" against "B",
    averaged over both orders (A/B swapped), which cancels the judge's position bias."""

    def p_first_letter(lefts: Sequence[str], rights: Sequence[str]) -> list[float]:
        questions = [
            JUDGE_TEMPLATE.format(prompt=p, first=left, second=right) for p, left, right in zip(prompts, lefts, rights)
        ]
        return next_word_odds(model, tokenizer, questions, ("A", "B"), batch_size, max_length)

    in_order, swapped = p_first_letter(first, second), p_first_letter(second, first)
    return [(a + (1.0 - b)) / 2 for a, b in zip(in_order, swapped)]


SINGLE_JUDGE_TEMPLATE = (
    "An assistant answered a request. Judge whether the answer is helpful, correct and clear.\n\n"
    "Request:\n{prompt}\n\nAnswer:\n{answer}\n\nIs this a good answer? Reply with the single word Yes or No."
)


def llm_approvals(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
    max_length: int = 2048,
) -> list[float]:
    """P(good answer) per item: the judge's next-token probability of "Yes" against "No"."""
    questions = [SINGLE_JUDGE_TEMPLATE.format(prompt=p, answer=a) for p, a in zip(prompts, answers)]
    return next_word_odds(model, tokenizer, questions, ("Yes", "No"), batch_size, max_length)


def judge_with_llm(
    store_path: str, judge_model: str, tie_margin: float = 0.05, name: str | None = None, threshold: float = 0.5
) -> dict[str, int]:
    """Label every task with a local LLM judge. A pair: asked in both orders, A when P(A better) >
    0.5 + tie_margin. A single answer: asked "is this a good answer?", 👍 when P(Yes) > threshold."""
    store = LabelStore(store_path)
    source = resolve(judge_model)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, ModelSettings(), torch.float32).eval()
    request = lambda prompt: "\n\n".join(m["content"] for m in prompt if m["role"] != "system")  # noqa: E731
    if store.kind == "single":
        answers = [store.answer(answer_id) for answer_id in store.answer_ids()]
        approval = llm_approvals(model, tokenizer, [request(a.prompt) for a in answers], [a.response for a in answers])
        counts = _record_thumbs(store, name or f"llm:{judge_model}", answers, [q > threshold for q in approval])
        store.close()
        return counts
    pairs = [store.pair(pair_id) for pair_id in store.pair_ids()]
    prompts = [request(p.prompt) for p in pairs]
    preference = llm_preferences(
        model, tokenizer, prompts, [p.response_a for p in pairs], [p.response_b for p in pairs]
    )
    counts = _record_verdicts(store, name or f"llm:{judge_model}", pairs, [q - 0.5 for q in preference], tie_margin)
    store.close()
    return counts


def export_preferences(
    store_path: str,
    output: str,
    kinds: Sequence[str] = ("human",),
    annotators: Sequence[str] | None = None,
    min_votes: int | None = None,
) -> dict:
    """Write the majority-vote labels as preference rows (prompt, chosen, rejected) in JSONL.

    A pair is exported when it has at least `min_votes` judgements (default: the pair's required
    count) and the majority rule names a winner. Returns counts and agreement figures (also written
    beside the output as OUTPUT.stats.json).
    """
    target = Path(output)
    stats_path = target.with_name(target.name + ".stats.json")
    check_output_files([target, stats_path], [Path(store_path)], "export output")
    store = LabelStore(store_path)
    table = by_pair(store.current_judgements(kinds, annotators))
    rows, counts = (
        [],
        {"pairs": len(store.pair_ids()), "labelled": 0, "too_few_votes": 0, "no_majority": 0, "exported": 0},
    )
    for pair_id, choices in sorted(table.items()):
        pair = store.pair(pair_id)
        counts["labelled"] += 1
        if len(choices) < (min_votes or pair.required):
            counts["too_few_votes"] += 1
            continue
        label = majority_label(list(choices.values()))
        if label is None:
            counts["no_majority"] += 1
            continue
        chosen, rejected = (pair.response_a, pair.response_b) if label == "a" else (pair.response_b, pair.response_a)
        rows.append(
            {
                "prompt": list(pair.prompt),
                "chosen": chosen,
                "rejected": rejected,
                "pair_id": pair_id,
                "votes": dict(sorted(choices.items())),
            }
        )
    store.close()
    counts["exported"] = len(rows)
    write_text_atomically(target, "".join(json_text(row) + "\n" for row in rows))
    stats = {**counts, "agreement": agreement_report(table)}
    write_json_atomically(stats_path, stats)
    return stats


def export_feedback(
    store_path: str,
    output: str,
    kinds: Sequence[str] = ("human",),
    annotators: Sequence[str] | None = None,
    min_votes: int | None = None,
    pairs_output: str | None = None,
) -> dict:
    """Write the majority 👍/👎 of each single answer as unpaired feedback rows (prompt,
    completion, label, and rating: the mean of the ratings given) in JSONL — what `rlhfkit kto`
    and a thumbs reward model read. With `pairs_output`, also every (liked, disliked) pair of
    answers to the same prompt as preference rows (prompt, chosen, rejected).

    An answer is exported when it has at least `min_votes` verdicts (default: its required count)
    and more 👍 than 👎 or the reverse. Returns counts and agreement (κ over the thumbs,
    Krippendorff's α over the ratings), also written beside the output as OUTPUT.stats.json.
    """
    target = Path(output)
    stats_path = target.with_name(target.name + ".stats.json")
    outputs = [target, stats_path] + ([Path(pairs_output)] if pairs_output else [])
    check_output_files(outputs, [Path(store_path)], "export output")
    store = LabelStore(store_path)
    thumbs, ratings = by_answer(store.current_verdicts(kinds, annotators))
    rows: list[dict] = []
    counts = {"answers": len(store.answer_ids()), "labelled": 0, "too_few_votes": 0, "no_majority": 0}
    for answer_id, labels in sorted(thumbs.items()):
        answer = store.answer(answer_id)
        counts["labelled"] += 1
        if len(labels) < (min_votes or answer.required):
            counts["too_few_votes"] += 1
            continue
        label = majority_thumb(list(labels.values()))
        if label is None:
            counts["no_majority"] += 1
            continue
        given = list(ratings.get(answer_id, {}).values())
        row = {"prompt": list(answer.prompt), "completion": answer.response, "label": label == "up"}
        if given:
            row["rating"] = sum(given) / len(given)
        rows.append({**row, "answer_id": answer_id, "votes": dict(sorted(labels.items()))})
    store.close()
    counts |= {
        "exported": len(rows),
        "desirable": sum(row["label"] for row in rows),
        "undesirable": sum(not row["label"] for row in rows),
    }
    write_text_atomically(target, "".join(json_text(row) + "\n" for row in rows))
    if pairs_output:
        derived = preference_pairs_from_feedback(rows)
        write_text_atomically(Path(pairs_output), "".join(json_text(row) + "\n" for row in derived))
        counts["derived_pairs"] = len(derived)
    agreement = agreement_report(thumbs, THUMBS)
    agreement["ratings_alpha_interval"] = krippendorff_alpha_interval(
        list(units.values()) for units in ratings.values()
    )
    stats = {**counts, "agreement": agreement}
    write_json_atomically(stats_path, stats)
    return stats


def preference_pairs_from_feedback(rows: Sequence[dict]) -> list[dict]:
    """Every (liked, disliked) combination of answers to the same prompt, as preference rows."""
    by_prompt: dict[str, dict[bool, list[dict]]] = {}
    for row in rows:
        key = json_text(row["prompt"])
        by_prompt.setdefault(key, {True: [], False: []})[row["label"]].append(row)
    return [
        {
            "prompt": liked["prompt"],
            "chosen": liked["completion"],
            "rejected": disliked["completion"],
            "answer_ids": [liked["answer_id"], disliked["answer_id"]],
        }
        for groups in by_prompt.values()
        for liked in groups[True]
        for disliked in groups[False]
    ]
