"""Scores of answer texts, without a model (SPEC §4, §5): ROUGE-L recall, the keyword hit, the leak
rule and distinct-n. Torch-free. Scores that need the model's likelihood are `likelihood`'s; TOFU's
aggregates (truth ratio, Model Utility, Forget Quality) are `tofu`'s.

ROUGE-L recall is TOFU's (Maini et al. 2024, arXiv 2401.06121; `evaluate_util.py::eval_rouge_recall`):
`RougeScorer(['rougeL'], use_stemmer=True).score(ground_truth, generated)`, on the generated
continuation exactly as decoded (for phi it starts with "Answer: " and is not truncated at the end
of the answer); checked against the real TOFU eval logs in `shared/fixtures/tofu/` (tests/test_tofu.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from probunlearn.utils import renamed_arguments


# ---------------------------------------------------------------------------------------------
# input checks


def _check_keywords(keywords) -> list[str]:
    if keywords is None:
        return []
    if isinstance(keywords, str):
        raise ValueError(
            f"keywords must be a list of strings, got the single string {keywords!r}; "
            f"wrap it in a list: [{keywords!r}]"
        )
    return [k for k in keywords if k]


# ---------------------------------------------------------------------------------------------
# text metrics


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of `prediction` against `reference`, `rouge_score` with stemming.

    Exactly TOFU's `evaluate_util.py::eval_rouge_recall`: `scorer.score(reference, prediction)`
    with `RougeScorer(['rougeL'], use_stemmer=True)`, applied to the text as generated (no
    stripping of an "Answer:" prefix or of text after the answer). Reproduces every stored
    `rougeL_recall` of the TOFU fixture logs bit for bit.
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise ValueError(
            f"rouge_l_recall takes two strings, got {type(prediction).__name__} "
            f"and {type(reference).__name__}"
        )
    return _rouge_scorer().score(reference, prediction)["rougeL"].recall


def keyword_hit(prediction: str, keywords) -> float:
    """1.0 if any keyword occurs in `prediction` (case-insensitive substring), else 0.0.

    SPEC §5 leak rule, first half. Empty keywords (or None) -> 0.0. A bare string is rejected,
    since iterating it would test single characters.
    """
    text = prediction.lower()
    return float(any(k.lower() in text for k in _check_keywords(keywords)))


@renamed_arguments(tau="leak_tau")
def is_leak(sample: str, reference: str, keywords, leak_tau: float = 0.5) -> bool:
    """Leak indicator of SPEC §5 ([P1] Scholten et al. 2025, binary leakage M_bin).

    Our reading of "keyword present, else ROUGE-L recall >= leak_tau": a record that has keywords
    leaks exactly when a keyword occurs in `sample` (case-insensitive); only a record without
    keywords (hub TOFU data) falls back to ROUGE-L recall of `sample` against `reference` >= leak_tau.
    Why: generated answers share templates ("X was born in Y."), so a wrong fact in the right
    template already reaches ROUGE-L recall >= 0.5; only the fact string tells a leak apart.
    """
    if not 0.0 <= leak_tau <= 1.0:
        raise ValueError(f"leak_tau is a ROUGE-L recall threshold in [0, 1], got {leak_tau}")
    if _check_keywords(keywords):
        return bool(keyword_hit(sample, keywords))
    return rouge_l_recall(sample, reference) >= leak_tau


def distinct_n(samples: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016, arXiv 1510.03055): unique n-grams / total n-grams over `samples`.

    Tokens are the lowercased whitespace-separated words; n-grams are taken within each sample
    (never across two samples) and pooled over all samples. 0.0 when no sample has n tokens.
    SPEC §4: diversity of the sampled answers on retain questions.
    """
    if isinstance(samples, str):
        raise ValueError("distinct_n takes a list of samples, got a single string; wrap it in a list")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    samples = list(samples)
    if not samples:
        raise ValueError("distinct_n got no samples")
    ngrams = []
    for sample in samples:
        tokens = sample.lower().split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not ngrams:
        return 0.0
    return len(set(ngrams)) / len(ngrams)
