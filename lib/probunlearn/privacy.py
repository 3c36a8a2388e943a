"""Membership inference on answer tokens, and MUSE's privleak (SPEC §4).

Members are the forget set's QA pairs (the target was fine-tuned on them); non-members are a
holdout of fictitious authors that no model saw (`data.holdout_authors`). Every attack gives a
*statistic* per item in which **lower means "member"** (a trained answer is more likely):

| attack | statistic | source |
|---|---|---|
| `loss` | mean answer NLL | Yeom et al. 2018 |
| `zlib` | mean answer NLL / length in bytes of zlib-compressed answer text | Carlini et al. 2021 |
| `min_k` | −(mean of the k·|y| lowest token log-probs) | Shi et al. 2024 (Min-K%) |
| `min_k_pp` | the same on (log p(y_t) − μ_t)/σ_t, μ_t, σ_t the mean and std of log p(v) under the model's own next-token distribution | Zhang et al. 2024 (Min-K%++) |

With k = 1, Min-K% is LOSS. The conventions follow OpenUnlearning (github.com/locuslab/
open-unlearning, `evals/metrics/mia`): ZLib divides the mean NLL by the compressed length; the
lowest ⌊k·|y|⌋ tokens (at least one) enter Min-K%, as in Shi et al.'s code.

`mia_auc` is the conventional ROC AUC of telling members from non-members by the statistic: 1 =
every member looks more trained than every non-member (the target model), 0.5 = chance (a model
that never saw the forget set), below 0.5 = members look *less* trained than strangers (an
over-unlearned model, itself a tell). `privleak` = (AUC_unlearned − AUC_retain) / AUC_retain
(MUSE, Shi et al. 2024), the retain model standing in for retraining: 0 is ideal, > 0 leaks
membership, < 0 over-unlearns. MUSE prints it as a percentage, with its AUC written as 1 − ours
(OpenUnlearning's `privleak` undoes that); we keep SPEC's fraction and the conventional AUC.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from probunlearn.likelihood import answer_token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def _lowest_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(k * len(values)))
    return float(np.sort(values)[:count].mean())


def statistics_from_tokens(stats: Sequence[dict], answers: Sequence[str], attack: str, k: float = 0.4) -> np.ndarray:
    """The attack's statistic per item from `likelihood.answer_token_stats` output (with
    `distribution=True` for `min_k_pp`), so that one forward pass serves every attack."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if not 0 < k <= 1:
        raise ValueError(f"k is the share of lowest tokens, in (0, 1]; got {k}")
    if len(stats) != len(answers):
        raise ValueError(f"{len(stats)} token statistics but {len(answers)} answers")
    out = []
    for item, answer in zip(stats, answers):
        logprob = np.asarray(item["logprob"], dtype=float)
        if attack == "loss":
            out.append(-logprob.mean())
        elif attack == "zlib":
            out.append(-logprob.mean() / len(zlib.compress(answer.encode("utf-8"))))
        elif attack == "min_k":
            out.append(-_lowest_mean(logprob, k))
        else:
            if "expected" not in item:
                raise ValueError("min_k_pp needs answer_token_stats(..., distribution=True)")
            standardised = (logprob - item["expected"]) / np.maximum(item["std"], 1e-12)
            out.append(-_lowest_mean(standardised, k))
    return np.asarray(out, dtype=float)


def mia_scores(model, tokenizer, questions, answers, attack: str = "loss", k: float = 0.4, *, batch_size: int = 32,
               trunk=None) -> np.ndarray:
    """The membership statistic of `attack` (see the module docstring; lower = more member-like)
    for each (question, answer) pair, on answer tokens."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    stats = answer_token_stats(model, tokenizer, questions, answers, batch_size=batch_size, trunk=trunk,
                               distribution=attack == "min_k_pp")
    return statistics_from_tokens(stats, list(answers), attack, k)


def all_mia_scores(model, tokenizer, questions, answers, *, k: float = 0.4, batch_size: int = 32,
                   trunk=None) -> dict[str, np.ndarray]:
    """{attack: statistics} for every attack in `ATTACKS`, from one forward pass."""
    stats = answer_token_stats(model, tokenizer, questions, answers, batch_size=batch_size, trunk=trunk,
                               distribution=True)
    return {attack: statistics_from_tokens(stats, list(answers), attack, k) for attack in ATTACKS}


def mia_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of separating members from non-members by a statistic in which lower = member:
    P(member < non-member) + ½·P(tie), via SciPy's Mann–Whitney U (U / (n_members · n_nonmembers))."""
    from scipy.stats import mannwhitneyu

    members = np.asarray(member_scores, dtype=float).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=float).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("mia_auc needs at least one member and one non-member score")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("mia_auc got NaN scores")
    u = mannwhitneyu(nonmembers, members, alternative="two-sided").statistic  # pairs with non-member > member
    return float(u / (members.size * nonmembers.size))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE's privleak (Shi et al. 2024, arXiv 2407.06460): (AUC_unlearned − AUC_retain) / AUC_retain."""
    if not 0 < auc_retain <= 1 or not 0 <= auc_unlearned <= 1:
        raise ValueError(f"AUCs must lie in [0, 1] (the retain model's above 0); got {auc_unlearned}, {auc_retain}")
    return float((auc_unlearned - auc_retain) / auc_retain)


def privacy_row(model, tokenizer, members, nonmembers, *, k: float = 0.4, batch_size: int = 32, trunk=None,
                retain_auc: dict | None = None) -> dict[str, float]:
    """`mia_auc_<attack>` for every attack between the `members` and `nonmembers` data sets
    (question/answer records), and `privleak_<attack>` when `retain_auc` ({attack: AUC of the
    retain model}) is given."""
    members_scores = all_mia_scores(model, tokenizer, members["question"], members["answer"], k=k,
                                    batch_size=batch_size, trunk=trunk)
    nonmember_scores = all_mia_scores(model, tokenizer, nonmembers["question"], nonmembers["answer"], k=k,
                                      batch_size=batch_size, trunk=trunk)
    row = {f"mia_auc_{a}": mia_auc(members_scores[a], nonmember_scores[a]) for a in ATTACKS}
    if retain_auc is not None:
        row |= {f"privleak_{a}": privleak(row[f"mia_auc_{a}"], retain_auc[a]) for a in ATTACKS}
    return row
