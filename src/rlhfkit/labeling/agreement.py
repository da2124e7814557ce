"""From judgements to labels: the majority rule, and agreement between annotators.

Choices are about the stored responses A and B (never about screen sides): "a", "b", "tie",
"both_bad". The majority rule, per pair:

1. "both_bad" votes that are a strict majority of all votes: no label (neither answer should be
   trained towards).
2. Otherwise votes for A and for B are compared ("tie" and "both_bad" abstain): the response with
   more votes is chosen; equal counts (including none): no label.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations

from rlhfkit.labeling.store import CHOICES, Judgement


def majority_label(choices: Sequence[str]) -> str | None:
    """'a' or 'b' by the majority rule above, or None."""
    votes = Counter(choices)
    if votes["both_bad"] * 2 > len(choices):
        return None
    if votes["a"] == votes["b"]:
        return None
    return "a" if votes["a"] > votes["b"] else "b"


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


def fleiss_kappa(item_counts: Sequence[dict[str, int]]) -> float:
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
    shares = [sum(counts.get(category, 0) for counts in item_counts) / (items * n) for category in CHOICES]
    chance = sum(p * p for p in shares)
    if chance == 1.0:
        return 1.0 if agreement == 1.0 else math.nan
    return (agreement - chance) / (1 - chance)


def agreement_report(table: dict[int, dict[str, str]]) -> dict[str, float | dict]:
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
        report["fleiss_kappa"] = {"raters": modal, "items": len(same), "kappa": fleiss_kappa(same)}
    return report
