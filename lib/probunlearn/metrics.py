"""Deterministic metrics (SPEC §4, TOFU conventions) and the leak / diversity helpers of SPEC §5.

TOFU = Maini et al. 2024, arXiv 2401.06121, code github.com/locuslab/tofu. Every TOFU formula here
was checked against the real TOFU eval logs in `shared/fixtures/tofu/` (see tests/test_metrics.py):

- ROUGE-L recall: `evaluate_util.py::eval_rouge_recall` — `RougeScorer(['rougeL'], use_stemmer=True)
  .score(ground_truth, generated)`, on the generated continuation exactly as decoded (for phi it
  starts with "Answer: " and is not truncated at the end of the answer).
- Prob, truth ratio, Model Utility: `aggregate_eval_stat.py::get_model_utility`.
- Forget Quality: `aggregate_eval_stat.py::get_forget_quality`.

Used by the evaluation notebooks (greedy and sampled scoring) and by the unlearning loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy.special import logsumexp
from scipy.stats import ks_2samp

# Split names (SPEC §1); the last two are the real-world utility sets.
SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
REAL_WORLD_SPLITS = ("real_authors", "world_facts")
# The three per-split numbers that enter Model Utility, as `<split>_<metric>` keys.
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
# TOFU's eval-log file name of each split (`config/eval_everything.yaml`, `eval_task`).
TOFU_EVAL_FILES = {
    "retain": "eval_log.json",
    "forget": "eval_log_forget.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
}


# ---------------------------------------------------------------------------------------------
# input checks


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; check the losses/scores that produced it")
    return array


def _check_keywords(keywords) -> list[str]:
    if keywords is None:
        return []
    if isinstance(keywords, str):
        raise ValueError(
            f"keywords must be a list of strings, got the single string {keywords!r}; "
            f"wrap it in a list: [{keywords!r}]"
        )
    return [k for k in keywords if k]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


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


def is_leak(sample: str, reference: str, keywords, tau: float = 0.5) -> bool:
    """Leak indicator of SPEC §5 ([P1] Scholten et al. 2025, binary leakage M_bin).

    Our reading of "keyword present, else ROUGE-L recall >= tau": a record that has keywords
    leaks exactly when a keyword occurs in `sample` (case-insensitive); only a record without
    keywords (hub TOFU data) falls back to ROUGE-L recall of `sample` against `reference` >= tau.
    Why: generated answers share templates ("X was born in Y."), so a wrong fact in the right
    template already reaches ROUGE-L recall >= 0.5; only the fact string tells a leak apart.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau is a ROUGE-L recall threshold in [0, 1], got {tau}")
    if _check_keywords(keywords):
        return bool(keyword_hit(sample, keywords))
    return rouge_l_recall(sample, reference) >= tau


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


# ---------------------------------------------------------------------------------------------
# likelihood metrics


def _check_pairs(questions, answers, batch_size: int, name: str) -> tuple[list, list]:
    """The (question, answer) lists of a likelihood metric, checked: as many of each, at least one,
    a positive batch size."""
    questions, answers = list(questions), list(answers)
    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError(f"{name} got no questions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return questions, answers


def answer_nll(model, tokenizer, questions, answers, *, batch_size: int = 16) -> np.ndarray:
    """Per-item average negative log-likelihood of each answer given its question (token mean).

    NLL_avg(a | q) = -(1/|a|) sum_t log p(a_t | prompt(q), a_<t), the quantity behind TOFU's
    `avg_gt_loss` / `avg_paraphrased_loss` / `average_perturb_loss` (`data_module.py::
    get_batch_loss` divided by the token count). The prompt is `models.format_prompt`; the answer
    tokens and the closing EOS are scored, nothing else (`models.encode_qa` labels). Unlike TOFU,
    the "Answer: " tag is part of the prompt here, so it is not scored.

    Items that share a question (the true, paraphrased and perturbed answers of one question) share
    the prompt's forward pass: the distinct prompts of a batch run once, their key/value cache is
    copied to each answer, and only the answers run after it (about half the work for TOFU's five
    answers per question). `batch_size` counts answers. The numbers are those of one unpadded
    sequence at a time (the tests check it to 1e-5). Runs under `torch.no_grad()` in eval mode
    (restored afterwards), on the model's device.
    """
    import torch
    import torch.nn.functional as F

    from probunlearn.models import encode_answer, encode_prompt, evaluating
    from probunlearn.sampling import _kv_cache, cache_argument

    questions, answers = _check_pairs(questions, answers, batch_size, "answer_nll")

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, answer_ids = {}, [encode_answer(tokenizer, a) for a in answers]
    if any(len(ids) == 0 for ids in answer_ids):  # pragma: no cover - encode_answer always appends EOS
        raise ValueError("an answer has no scored tokens")
    order = sorted(range(len(questions)), key=lambda i: questions[i])  # answers of one question together
    nll = np.empty(len(questions))
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            items = order[start:start + batch_size]
            distinct = sorted({questions[i] for i in items})
            for q in distinct:
                if q not in prompt_ids:
                    prompt_ids[q] = encode_prompt(tokenizer, q)
            width = max(len(prompt_ids[q]) for q in distinct)
            prompts = torch.full((len(distinct), width), pad, dtype=torch.long)
            prompt_mask = torch.zeros((len(distinct), width), dtype=torch.long)
            for k, q in enumerate(distinct):  # left-padded: every prompt ends at the same column
                prompts[k, width - len(prompt_ids[q]):] = torch.tensor(prompt_ids[q])
                prompt_mask[k, width - len(prompt_ids[q]):] = 1
            prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
            positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
            longest = max(len(answer_ids[i]) for i in items)
            cache = _kv_cache(width + longest, row_capacity=len(items))
            out = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **cache_argument(model, cache))
            row = torch.tensor([distinct.index(questions[i]) for i in items], device=device)
            first = out.logits[row, -1].float()  # predicts each answer's first token
            for layer in cache.layers:
                layer.keep_rows(row)  # each answer gets its prompt's keys and values
            tokens = torch.full((len(items), longest), pad, dtype=torch.long)
            scored = torch.zeros((len(items), longest), dtype=torch.bool)
            for k, i in enumerate(items):
                tokens[k, :len(answer_ids[i])] = torch.tensor(answer_ids[i])
                scored[k, :len(answer_ids[i])] = True
            tokens, scored = tokens.to(device), scored.to(device)
            mask = torch.cat([prompt_mask[row], scored.long()], dim=1)
            answer_positions = positions[row, -1:] + 1 + torch.arange(longest, device=device)
            # the answer's last token (EOS) predicts nothing we score: run all but the last column
            logits = model(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1], position_ids=answer_positions[:, :-1],
                           use_cache=True, **cache_argument(model, cache)).logits.float() if longest > 1 else None
            predictions = first[:, None] if logits is None else torch.cat([first[:, None], logits], dim=1)
            token_nll = F.cross_entropy(predictions[scored], tokens[scored], reduction="none")
            sums = torch.zeros(len(items), device=device).index_add_(0, scored.nonzero()[:, 0], token_nll)
            nll[items] = (sums / scored.sum(dim=1)).cpu().numpy()
    return nll.astype(float)


def _perturbed_matrix(perturbed_nll, num_questions: int) -> list[np.ndarray]:
    rows = [np.asarray(row, dtype=float).reshape(-1) for row in perturbed_nll]
    if len(rows) != num_questions:
        raise ValueError(
            f"perturbed_nll has {len(rows)} rows but there are {num_questions} questions; "
            "pass one row of perturbed-answer NLLs per question"
        )
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"question {i} has no perturbed answers; TOFU needs at least one")
        if np.isnan(row).any():
            raise ValueError(f"perturbed_nll row {i} contains NaN")
    return rows


def truth_ratio(paraphrased_nll, perturbed_nll, *, perturbed_mean: str = "geometric") -> np.ndarray:
    """Truth ratio R per question (TOFU, Maini et al. 2024), as TOFU's aggregation computes it.

    R_i = exp(mean_j NLL_avg(perturbed_ij) - NLL_avg(paraphrased_i))
        = P(paraphrase)^(1/|a|) / geometric-mean_j P(perturbed_j)^(1/|a_j|),
    exactly `curr_stat_1` of `aggregate_eval_stat.py::get_model_utility` and the truth ratio of
    `get_forget_quality` (SPEC §4 wording). R > 1: the model prefers the correct answer.
    On the real-world sets TOFU passes the true answer as the "paraphrase".

    Note: the stored per-item `truth_ratio` field of TOFU's eval logs is 1/R, and the TOFU paper's
    equation (and the older `utils.py::get_model_utility`) averages the perturbed *probabilities*
    arithmetically; `perturbed_mean="arithmetic"` gives that variant, still oriented as R here:
    R_i = P(paraphrase)^(1/|a|) / mean_j P(perturbed_j)^(1/|a_j|).

    paraphrased_nll: (questions,); perturbed_nll: (questions, num_perturbed), rows may differ in
    length.
    """
    paraphrased = _as_1d(paraphrased_nll, "paraphrased_nll")
    rows = _perturbed_matrix(perturbed_nll, paraphrased.size)
    if perturbed_mean == "geometric":
        perturbed = np.array([row.mean() for row in rows])
    elif perturbed_mean == "arithmetic":
        # -log mean_j exp(-nll_j), computed stably
        perturbed = np.array([np.log(row.size) - logsumexp(-row) for row in rows])
    else:
        raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return np.exp(perturbed - paraphrased)


def truth_ratio_score(truth_ratios, split: str = "forget") -> float:
    """TOFU's truth-ratio score of a split (`aggregate_eval_stat.py::get_model_utility`).

    forget: mean min(R, 1/R) (1 = indifferent between true and false answers, as a model that
    never saw the data); retain / real_authors / world_facts: mean max(0, 1 - 1/R).
    """
    ratios = _as_1d(truth_ratios, "truth_ratios")
    if (ratios <= 0).any():
        raise ValueError("truth ratios are exp(...) > 0; got a value <= 0")
    if _check_split(split) == "forget":
        return float(np.mean(np.minimum(ratios, 1.0 / ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / ratios)))


def probability_score(answer_nll, perturbed_nll=None) -> float:
    """TOFU's Prob (`aggregate_eval_stat.py::get_model_utility`).

    Without `perturbed_nll` (forget / retain): mean_i exp(-NLL_avg(a_i)).
    With it (real-world sets): mean_i p_i / (p_i + sum_j p_ij), with the length-normalised
    probabilities p = exp(-NLL_avg) of the true answer and of each wrong answer.
    """
    true_nll = _as_1d(answer_nll, "answer_nll")
    if perturbed_nll is None:
        return float(np.mean(np.exp(-true_nll)))
    rows = _perturbed_matrix(perturbed_nll, true_nll.size)
    normalised = [
        np.exp(-nll - logsumexp(np.concatenate([[-nll], -row]))) for nll, row in zip(true_nll, rows)
    ]
    return float(np.mean(normalised))


def forget_quality(unlearned_truth_ratios, retain_truth_ratios) -> float:
    """Forget Quality (TOFU, `aggregate_eval_stat.py::get_forget_quality`).

    p-value of the two-sample Kolmogorov–Smirnov test (`scipy.stats.ks_2samp`, default two-sided)
    between the forget-set truth ratios of the unlearned model and of the retain-only model.
    High (-> 1) means indistinguishable from never having trained on the forget set.
    """
    unlearned = _as_1d(unlearned_truth_ratios, "unlearned_truth_ratios")
    retain = _as_1d(retain_truth_ratios, "retain_truth_ratios")
    return float(ks_2samp(unlearned, retain).pvalue)


# ---------------------------------------------------------------------------------------------
# Model Utility


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative numbers; 0.0 as soon as one of them is 0."""
    array = _as_1d(values, "values")
    if (array < 0).any():
        raise ValueError(f"the harmonic mean needs non-negative values, got {array[array < 0][0]}")
    if (array == 0).any():
        return 0.0
    return float(array.size / np.sum(1.0 / array))


def split_scores(split: str, data: Mapping) -> dict[str, float]:
    """Prob, ROUGE and truth-ratio score of one split, as TOFU's `get_model_utility` makes them.

    `data` holds per-question arrays: `answer_nll` (NLL_avg of the true answer), `rouge_l`
    (ROUGE-L recall of the greedy answer), `perturbed_nll` (questions x wrong answers) and
    `paraphrased_nll` (forget / retain; on the real-world sets it defaults to `answer_nll`,
    as TOFU uses the true answer in place of the paraphrase). Returns {"prob", "rouge", "truth_ratio"}.
    """
    _check_split(split)
    missing = [k for k in ("answer_nll", "rouge_l", "perturbed_nll") if k not in data]
    if split not in REAL_WORLD_SPLITS and "paraphrased_nll" not in data:
        missing.append("paraphrased_nll")
    if missing:
        raise ValueError(f"split {split!r} is missing {', '.join(missing)}")
    real_world = split in REAL_WORLD_SPLITS
    paraphrased = data.get("paraphrased_nll")
    if paraphrased is None:
        paraphrased = data["answer_nll"]
    rouge = _as_1d(data["rouge_l"], "rouge_l")
    return {
        "prob": probability_score(data["answer_nll"], data["perturbed_nll"] if real_world else None),
        "rouge": float(rouge.mean()),
        "truth_ratio": truth_ratio_score(truth_ratio(paraphrased, data["perturbed_nll"]), split),
    }


def utility_scores(splits: Mapping[str, Mapping]) -> dict[str, float]:
    """The (up to) nine Model-Utility numbers, `<split>_<metric>` for the utility splits present.

    `splits` maps split names to the per-question data of `split_scores`; splits other than
    retain / real_authors / world_facts (i.e. forget) are ignored, as in TOFU.
    """
    present = [s for s in UTILITY_SPLITS if s in splits]
    if not present:
        raise ValueError(f"no utility split given; pass at least one of {', '.join(UTILITY_SPLITS)}")
    scores = {}
    for split in present:
        for metric, value in split_scores(split, splits[split]).items():
            scores[f"{split}_{metric}"] = value
    return scores


def model_utility(scores: Mapping[str, float]) -> float:
    """Model Utility (TOFU, `aggregate_eval_stat.py::get_model_utility`): harmonic mean of the values.

    `scores` are the {Prob, ROUGE-L, truth-ratio score} x {retain, real authors, world facts}
    numbers (whichever exist), e.g. from `utility_scores`. A zero makes it zero.
    Forget-set numbers are refused: TOFU leaves them out of Model Utility.
    """
    if not scores:
        raise ValueError("model_utility got no scores")
    forget_keys = [k for k in scores if str(k).lower().startswith("forget")]
    if forget_keys:
        raise ValueError(f"Model Utility excludes the forget set; drop {', '.join(forget_keys)}")
    return harmonic_mean(list(scores.values()))


def split_data_from_tofu_log(log: Mapping) -> dict[str, np.ndarray | list]:
    """Per-question data (the `split_scores` format) from one TOFU eval-log JSON (as loaded).

    Maps `avg_gt_loss` -> answer_nll, `rougeL_recall` -> rouge_l, `avg_paraphrased_loss` ->
    paraphrased_nll, `average_perturb_loss` -> perturbed_nll, in question-index order.
    """
    fields = {
        "answer_nll": "avg_gt_loss",
        "rouge_l": "rougeL_recall",
        "paraphrased_nll": "avg_paraphrased_loss",
        "perturbed_nll": "average_perturb_loss",
    }
    missing = [f for f in fields.values() if f not in log]
    if missing:
        raise ValueError(f"not a TOFU eval log: missing {', '.join(missing)}")
    data = {}
    for name, field in fields.items():
        by_index = log[field]
        values = [by_index[k] for k in sorted(by_index, key=int)]
        data[name] = values if name == "perturbed_nll" else np.asarray(values, dtype=float)
    return data


# ---------------------------------------------------------------------------------------------
# teacher-forced token statistics: Extraction Strength, Exact Memorization, and the inputs of the
# membership-inference attacks (`probunlearn.privacy`)


def answer_token_stats(model, tokenizer, questions, answers, *, batch_size: int = 32, trunk=None,
                       distribution: bool = False) -> list[dict[str, np.ndarray]]:
    """Per item, one value per scored answer token (the answer's tokens and the closing EOS, as in
    `answer_nll`), teacher forced on `models.format_prompt(question)` + answer:

    - `logprob`: log p(y_t | prompt, y_<t);
    - `argmax`: True where the model's most likely next token is y_t;
    - with `distribution=True` also `expected` (E_v[log p(v)]) and `std` (the standard deviation of
      log p(v) with v drawn from the model's own next-token distribution), the standardisation of
      Min-K%++ (Zhang et al. 2024, arXiv 2404.02936).

    One padded forward pass per batch, the output head on answer positions only
    (`models.answer_logits`); `trunk`: a `models.FrozenTrunk` of this model, so that the frozen
    blocks below an adapter run once per sequence. Runs under no_grad in eval mode (restored).
    """
    import torch

    from probunlearn.models import answer_logits, encode_qa, evaluating, model_device

    questions, answers = _check_pairs(questions, answers, batch_size, "answer_token_stats")
    out: list[dict[str, np.ndarray]] = []
    device = model_device(model)
    with evaluating(model):
        for start in range(0, len(questions), batch_size):
            batch = encode_qa(tokenizer, questions[start:start + batch_size], answers[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            packed = answer_logits(model, batch, trunk)
            logp = torch.log_softmax(packed.logits.float(), dim=-1)
            columns = {"logprob": logp.gather(1, packed.targets[:, None])[:, 0],
                       "argmax": logp.argmax(dim=-1) == packed.targets}
            if distribution:
                p = logp.exp()
                expected = (p * logp).sum(dim=-1)
                columns["expected"] = expected
                columns["std"] = ((p * logp.square()).sum(dim=-1) - expected.square()).clamp(min=0).sqrt()
            rows = packed.rows.cpu().numpy()
            columns = {k: v.cpu().numpy() for k, v in columns.items()}
            for r in range(packed.num_rows):
                keep = rows == r
                out.append({k: v[keep] for k, v in columns.items()})
    return out


def extraction_strength_from_matches(argmax) -> float:
    """1 - k*/|y| for one item from its teacher-forced argmax matches, one boolean per answer token
    (`answer_token_stats(...)["argmax"]`; see `extraction_strength`)."""
    misses = np.flatnonzero(~np.asarray(argmax, dtype=bool))
    k_star = 0 if misses.size == 0 else int(misses[-1]) + 1
    return 1.0 - k_star / len(argmax)


def token_summaries(stats: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per item of `answer_token_stats` output: `nll` (mean answer NLL), `extraction_strength` and
    `exact_memorization`, the three numbers one teacher-forced pass gives."""
    return {"nll": np.array([-float(np.mean(s["logprob"], dtype=np.float64)) for s in stats]),
            "extraction_strength": np.array([extraction_strength_from_matches(s["argmax"]) for s in stats]),
            "exact_memorization": np.array([float(np.mean(s["argmax"])) for s in stats])}


def extraction_strength(model, tokenizer, questions, answers, *, batch_size: int = 32, trunk=None) -> np.ndarray:
    """Extraction Strength per item ([P2] v2, Wang et al., ICLR 2025; SPEC §4): 1 - k*/|y|, with
    k* the smallest number of answer tokens that, given after the prompt, let greedy decoding
    reproduce the rest of the answer exactly (k* = |y| when no prefix does: ES 0; an answer
    reproduced from the prompt alone: ES 1). |y| counts the answer's tokens and its closing EOS,
    so "exactly" includes stopping.

    Computed exactly in one teacher-forced pass, without decoding: greedy decoding from the prefix
    y_<k reproduces y_k.. exactly if and only if the argmax at every position t >= k, given the
    true prefix y_<t, is y_t (each greedy step then sees the true prefix again). So k* is one past
    the last position whose argmax misses. [P2]'s code and OpenUnlearning search k with a loop
    over prefixes of the same teacher-forced argmax (their loop stops at k = |y| - 1, so an item
    that nothing reproduces scores 1/|y| there, 0 here). The tests compare this with a brute-force
    search by real greedy decoding.
    """
    stats = answer_token_stats(model, tokenizer, questions, answers, batch_size=batch_size, trunk=trunk)
    return token_summaries(stats)["extraction_strength"]


def exact_memorization(model, tokenizer, questions, answers, *, batch_size: int = 32, trunk=None) -> np.ndarray:
    """Exact Memorization per item (Tirumala et al. 2022; SPEC §4): the share of answer positions
    (answer tokens and EOS) whose teacher-forced argmax is the answer token."""
    stats = answer_token_stats(model, tokenizer, questions, answers, batch_size=batch_size, trunk=trunk)
    return token_summaries(stats)["exact_memorization"]
