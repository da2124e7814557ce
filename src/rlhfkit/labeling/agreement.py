"""From judgements to labels: the majority rule, and agreement between annotators.

Pairwise stores:

Choices are about the stored responses A and B (never about screen sides): "a", "b", "tie",
"both_bad". The majority rule, per pair:

1. "both_bad" votes that are a strict majority of all votes: no label (neither answer should be
   trained towards).
2. Otherwise votes for A and for B are compared ("tie" and "both_bad" abstain): the response with
   more votes is chosen; equal counts (including none): no label.

Single-answer stores: the answer's label is the majority of 👍 and 👎 votes (equal counts: no
label); its rating the mean of the ratings given. Agreement is κ over the thumbs and
Krippendorff's α over the ratings.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations

from rlhfkit.labeling.schema import CHOICES, Judgement, Verdict


def majority_label(choices: Sequence[str]) -> str | None:
    """'a' or 'b' by the majority rule above, or None."""
    votes = Counter(choices)
    if votes["both_bad"] * 2 > len(choices):
        return None
    if votes["a"] == votes["b"]:
        return None
    return "a" if votes["a"] > votes["b"] else "b"


def majority_thumb(labels: Sequence[str]) -> str | None:
    """'up' or 'down', whichever has more votes, or None on equal counts."""
    votes = Counter(labels)
    if votes["up"] == votes["down"]:
        return None
    return "up" if votes["up"] > votes["down"] else "down"


def by_answer(verdicts: Iterable[Verdict]) -> tuple[dict[int, dict[str, str]], dict[int, dict[str, int]]]:
    """({answer_id: {annotator: "up" | "down"}}, {answer_id: {annotator: rating}} for the ratings given)."""
    thumbs: dict[int, dict[str, str]] = defaultdict(dict)
    ratings: dict[int, dict[str, int]] = defaultdict(dict)
    for verdict in verdicts:
        thumbs[verdict.answer_id][verdict.annotator] = verdict.label
        if verdict.rating is not None:
            ratings[verdict.answer_id][verdict.annotator] = verdict.rating
    return dict(thumbs), dict(ratings)


def krippendorff_alpha_interval(units: Iterable[Sequence[float]]) -> float:
    """Krippendorff's α for interval data (ratings), with any number of raters per unit and
    missing ratings: α = 1 − D_o / D_e, with δ(c, k) = (c − k)² and only units rated at least
    twice counting (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):

        D_o = (1/n) Σ_u 1/(m_u − 1) Σ_{i≠j in u} (v_i − v_j)²
        D_e = 1/(n (n − 1)) Σ_{i≠j over all n pairable values} (v_i − v_j)²

    NaN when fewer than two units are pairable or every value is the same.
    """
    pairable = [list(values) for values in units if len(values) >= 2]
    values = [value for unit in pairable for value in unit]
    n = len(values)
    if len(pairable) < 2:
        return math.nan
    squared = lambda unit: sum((a - b) ** 2 for a in unit for b in unit)  # noqa: E731  (ordered pairs; i = j adds 0)
    observed = sum(squared(unit) / (len(unit) - 1) for unit in pairable) / n
    expected = squared(values) / (n * (n - 1))
    if expected == 0:
        return math.nan
    return 1 - observed / expected


def by_pair(judgements: Iterable[Judgement]) -> dict[int, dict[str, str]]:
    """{pair_id: {annotator: choice}}."""
    table: dict[int, dict[str, str]] = defaultdict(dict)
    for judgement in judgements:
        table[judgement.pair_id][judgement.annotator] = judgement.choice
    return dict(table)


def percent_agreement(table: dict[int, dict[str, str]]) -> float:
    """Share of annotator pairs, over all items rated by at least two, that gave the same choice."""
    agree = total = 0
    for choices in table.values():
        for first, second in combinations(choices.values(), 2):
            agree += first == second
            total += 1
    return agree / total if total else math.nan


def cohens_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) for two raters' labels of the same items."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    if not first:
        return math.nan
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    counts_first, counts_second = Counter(first), Counter(second)
    expected = sum(counts_first[c] * counts_second[c] for c in set(first) | set(second)) / (n * n)
    if expected == 1.0:
        return 1.0 if observed == 1.0 else math.nan
    return (observed - expected) / (1 - expected)


def fleiss_kappa(item_counts: Sequence[dict[str, int]], categories: Sequence[str] = CHOICES) -> float:
    """Fleiss' κ for items each rated by the same number n ≥ 2 of raters.

    P_i = (Σ_j n_ij² − n) / (n(n − 1)), P̄ = mean P_i, p_j = Σ_i n_ij / (N n), P̄_e = Σ_j p_j²,
    κ = (P̄ − P̄_e) / (1 − P̄_e).
    """
    if not item_counts:
        return math.nan
    raters = {sum(counts.values()) for counts in item_counts}
    if len(raters) != 1 or next(iter(raters)) < 2:
        raise ValueError("Fleiss' kappa needs the same number (≥ 2) of ratings for every item")
    n, items = next(iter(raters)), len(item_counts)
    agreement = sum((sum(c * c for c in counts.values()) - n) / (n * (n - 1)) for counts in item_counts) / items
    shares = [sum(counts.get(category, 0) for counts in item_counts) / (items * n) for category in categories]
    chance = sum(p * p for p in shares)
    if chance == 1.0:
        return 1.0 if agreement == 1.0 else math.nan
    return (agreement - chance) / (1 - chance)


def agreement_report(table: dict[int, dict[str, str]], categories: Sequence[str] = CHOICES) -> dict[str, float | dict]:
    """Percent agreement, Cohen's κ for every pair of annotators, and Fleiss' κ over items with the modal rating count."""
    annotators = sorted({name for choices in table.values() for name in choices})
    cohen = {}
    for first, second in combinations(annotators, 2):
        shared = [choices for choices in table.values() if first in choices and second in choices]
        if shared:
            cohen[f"{first} vs {second}"] = {
                "items": len(shared),
                "kappa": cohens_kappa([c[first] for c in shared], [c[second] for c in shared]),
            }
    multi = [choices for choices in table.values() if len(choices) >= 2]
    report: dict[str, float | dict] = {
        "items": len(table),
        "items_with_2_or_more": len(multi),
        "percent_agreement": percent_agreement(table),
        "cohens_kappa": cohen,
    }
    if multi:
        modal = Counter(len(choices) for choices in multi).most_common(1)[0][0]
        same = [Counter(choices.values()) for choices in multi if len(choices) == modal]
        report["fleiss_kappa"] = {"raters": modal, "items": len(same), "kappa": fleiss_kappa(same, categories)}
    return report
