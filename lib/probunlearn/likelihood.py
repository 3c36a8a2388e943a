"""Scores that read the model's likelihood of given answers, teacher forced (SPEC §4): the answer NLL
behind TOFU's Prob and truth ratio, Extraction Strength, Exact Memorization, and the per-token
statistics that the membership-inference attacks (`privacy`) read. Answer tokens and the closing EOS
are scored, nothing else (`answers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probunlearn.answers import answer_logits
from probunlearn.hardware import model_device
from probunlearn.kv_cache import cache_argument, kv_cache
from probunlearn.models import encode_answer, encode_prompt, encode_qa, evaluating


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
            cache = kv_cache(width + longest, row_capacity=len(items))
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
    (`answers.answer_logits`); `trunk`: a `answers.FrozenTrunk` of this model, so that the frozen
    blocks below an adapter run once per sequence. Runs under no_grad in eval mode (restored).
    """
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
