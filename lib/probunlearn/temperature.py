"""Adaptive temperature scaling at sampling time ([P1] Scholten et al., ICLR 2025, §5; SPEC §2).

[P1] pairs entropy optimisation (`objectives.entropy_regulariser`: push the next-token entropy
down on forget questions) with *adaptive temperature scaling*: where the model is confident, sample
at a low temperature, so that the confident forget answers are decoded as greedily as they are
evaluated. The paper names the idea; its public code has no implementation. Two readings, both
offered, each with its source (SPEC §2):

(a) **Confidence rule** (`ConfidenceTemperature`), the reading of a third-party reimplementation
    (the Leak@k evaluation code's `generate_with_adaptive_temperature`): at step t of an answer the
    confidence c_t is the mean, over that answer's steps 1..t, of the top-token probability of the
    raw next-token distribution; if c_t > c_T (default 0.9) the step is greedy, else sampled at T.
    The state (the running mean) is per answer, carried by the sampler (`processors.DecodingStep`).
(b) **Entropy rule** (`AdaptiveTemperature`), our earlier reading: if the entropy H_t of the raw
    next-token distribution is below h_τ, sample at `low_temperature` (default 0: greedy), else at
    T; h_τ is the `quantile` (default 5 %) of the per-step entropies the same model shows when it
    samples answers to *retain* questions (`calibrate_threshold`), so retain sampling is unchanged
    in ≥ 95 % of its steps.

Both are logits processors for `sampling.sample_answers` (they see raw logits, before the sampler
divides by the temperature; put them first) and count how often their low branch fires, weighted by
the answers each decoded row stands for, so a notebook can report the rate on forget vs retain
questions. `evaluate_adaptive` evaluates a model plainly and under each reading, re-decoding only
the answers a reading could change. Used by notebook 04.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probunlearn import bounds
from probunlearn.probabilistic import evaluate_model, score_samples
from probunlearn.processors import DecodingStep
from probunlearn.sampling import answer_texts, sample_rows, sample_token_ids
from probunlearn.utils import renamed_arguments

__all__ = ["next_token_entropy", "EntropyRecorder", "AdaptiveTemperature", "ConfidenceTemperature",
           "calibrate_threshold", "threshold_from_entropies", "StepTrace", "evaluate_adaptive", "READINGS"]


def next_token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(scores) per row, in float32; -inf logits contribute nothing."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)


def top_probability(scores: torch.Tensor) -> torch.Tensor:
    """Probability of the most likely token of softmax(scores) per row, in float32."""
    return torch.softmax(scores.float(), dim=-1).max(dim=-1).values


def _weights(info: DecodingStep | None, rows: int) -> np.ndarray:
    """How many answers each row stands for (1 each when called outside the sampler)."""
    return np.ones(rows, dtype=np.int64) if info is None else info.weights.cpu().numpy()


class EntropyRecorder:
    """A logits processor that changes nothing and records the next-token entropy of every answer at
    every step (`entropies`, a 1-D array). The sampler passes only rows still generating; a row
    that stands for several answers (a shared prefix) is recorded once per answer."""

    row_aware = True

    def __init__(self):
        self._chunks: list[np.ndarray] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, info: DecodingStep | None = None) -> torch.Tensor:
        entropies = next_token_entropy(scores).cpu().numpy()
        self._chunks.append(np.repeat(entropies, _weights(info, len(entropies))))
        return scores

    @property
    def entropies(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)


class _TwoBranchTemperature:
    """What both readings share: where `_low(scores, info)` is True the row is decoded at
    `low_temperature` (0: greedy) instead of the sampler's `temperature`, and the answers in the low
    branch are counted. The sampler divides what this returns by `temperature`, so a low row's
    logits are multiplied by temperature / low_temperature (net effect: logits / low_temperature);
    low_temperature = 0 keeps only the most likely token(s), i.e. greedy decoding, whatever the
    sampler's temperature and top-p. `fired` / `steps` count answers in the low branch / all answers
    seen, one per step; `fire_rate` is their ratio; `reset()` zeroes them (one processor per split
    gives per-split rates)."""

    row_aware = True
    reading = ""

    def __init__(self, threshold: float, *, low_temperature: float = 0.0, temperature: float = 1.0):
        if not np.isfinite(threshold):
            raise ValueError(f"the threshold of {type(self).__name__} must be a finite number, got {threshold!r}")
        if low_temperature < 0 or (low_temperature > 0 and temperature <= 0):
            raise ValueError(f"low_temperature must be >= 0 (0: greedy) and temperature > 0 when it is not; "
                             f"got low_temperature={low_temperature!r}, temperature={temperature!r}")
        self.threshold = float(threshold)
        self.low_temperature = float(low_temperature)
        self.temperature = float(temperature)
        self.reset()

    def reset(self) -> None:
        self.fired, self.steps = 0, 0

    @property
    def fire_rate(self) -> float:
        return self.fired / self.steps if self.steps else float("nan")

    def _low(self, scores: torch.Tensor, info: DecodingStep | None) -> torch.Tensor:
        raise NotImplementedError

    def fires_in(self, trace: "StepTrace") -> np.ndarray:
        """Per step recorded by `trace` (a plain sampling pass): would the low branch fire there?"""
        raise NotImplementedError

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, info: DecodingStep | None = None) -> torch.Tensor:
        low = self._low(scores, info)
        weights = _weights(info, len(low))
        self.fired += int(weights[low.cpu().numpy()].sum())
        self.steps += int(weights.sum())
        if not low.any():
            return scores
        scores = scores.clone()
        rows = scores[low]
        if self.low_temperature == 0:
            rows = torch.where(rows == rows.max(dim=-1, keepdim=True).values, rows, float("-inf"))
        else:
            rows = rows * (self.temperature / self.low_temperature)
        scores[low] = rows
        return scores


class AdaptiveTemperature(_TwoBranchTemperature):
    """The entropy reading (b) of SPEC §2: rows whose next-token entropy is below `threshold` (h_τ,
    from `calibrate_threshold`) are sampled at `low_temperature` instead of the sampler's
    `temperature`. Our earlier reading of [P1] §5; no per-answer state."""

    reading = "entropy"

    def _low(self, scores, info):
        return next_token_entropy(scores) < self.threshold

    def fires_in(self, trace):
        return trace.entropies < self.threshold


class ConfidenceTemperature(_TwoBranchTemperature):
    """The confidence reading (a) of SPEC §2, from a third-party reimplementation of [P1]'s adaptive
    temperature (the Leak@k evaluation code, `generate_with_adaptive_temperature`, c_T = 0.9): at
    step t of an answer, c_t = mean over the answer's steps 1..t of the top-token probability of the
    raw logits; if c_t > `threshold` the step is decoded greedily (`low_temperature` 0), else sampled
    at `temperature`. threshold 0: every step greedy; threshold 1: plain sampling (c_t ≤ 1).

    The running mean is per-answer state (`initial_state`, `processors.DecodingStep`): the sampler
    carries it with each answer's prefix, so an answer never depends on `batch_size` or on the
    other answers. Use as `sample_answers(..., logits_processors=[ConfidenceTemperature()])`."""

    reading = "confidence"

    def __init__(self, threshold: float = 0.9, *, low_temperature: float = 0.0, temperature: float = 1.0):
        super().__init__(threshold, low_temperature=low_temperature, temperature=temperature)

    @staticmethod
    def initial_state(rows: int, device) -> torch.Tensor:
        """(sum of the top-token probabilities so far, steps so far) per row: zeros at the prompt."""
        return torch.zeros((rows, 2), dtype=torch.float64, device=device)

    def _low(self, scores, info):
        top = top_probability(scores).double()
        state = info.state if info is not None and info.state is not None else self.initial_state(len(top), top.device)
        state = state + torch.stack([top, torch.ones_like(top)], dim=1)
        if info is not None:
            info.state = state
        return state[:, 0] / state[:, 1] > self.threshold

    def fires_in(self, trace):
        return trace.running_confidence() > self.threshold


READINGS = {"entropy": AdaptiveTemperature, "confidence": ConfidenceTemperature}


@renamed_arguments(n="num_samples")
def calibrate_threshold(model, tokenizer, retain_questions: Sequence[str], *, quantile: float = 0.05,
                        num_samples: int = 16, max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
                        seed: int = 0, batch_size: int | None = None, progress: bool = True) -> dict:
    """h_τ for `AdaptiveTemperature`: the `quantile` of the next-token entropies of `model` over
    every decoding step of `num_samples` sampled answers to each retain question (SPEC §2). Returns
    {'threshold', 'quantile', 'steps', 'entropies'}."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), e.g. 0.05, got {quantile!r}")
    recorder = EntropyRecorder()
    sample_token_ids(model, tokenizer, list(retain_questions), num_samples=num_samples, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, logits_processors=[recorder],
                     batch_size=batch_size, progress=progress)
    return threshold_from_entropies(recorder.entropies, quantile) | {"entropies": recorder.entropies}


def threshold_from_entropies(entropies, quantile: float = 0.05) -> dict:
    """{'threshold': the `quantile` of `entropies`, 'quantile', 'steps'}: the calibration step of
    `calibrate_threshold`, for entropies recorded elsewhere (e.g. by an `EntropyRecorder` during
    the plain sampling pass)."""
    entropies = np.asarray(entropies, dtype=float)
    if entropies.size == 0:
        raise ValueError("no decoding steps to calibrate on: pass at least one retain question")
    # method="lower": h_tau is one of the recorded entropies, so at most a `quantile` share of the
    # calibration steps lies strictly below it (interpolation could put slightly more below)
    return {"threshold": float(np.quantile(entropies, quantile, method="lower")), "quantile": float(quantile),
            "steps": int(entropies.size)}


class StepTrace:
    """A sampler step observer (`sampling.sample_token_ids(..., step_observer=...)`) that keeps, for
    every decoded answer (question i, sample j) and step, the next-token entropy and top-token
    probability of the raw logits and whether the chosen token was their unique argmax. That is
    enough to know, for either reading of adaptive temperature, which answers it could change
    (`rows_to_redraw`) and how often it would fire on the others (`low_steps`), without decoding
    them again. `entropies` lists every step's entropy, one per answer and step."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, ...]] = []

    def __call__(self, questions: np.ndarray, samples: np.ndarray, step: int, logits: torch.Tensor,
                 rows: torch.Tensor, tokens: torch.Tensor) -> None:
        top = logits.float().topk(2, dim=-1)
        unique = top.values[:, 0] > top.values[:, 1]
        unique_argmax = (tokens == top.indices[rows, 0]) & unique[rows]
        self._parts.append((np.asarray(questions), np.asarray(samples), np.full(len(questions), step),
                            next_token_entropy(logits)[rows].cpu().numpy(), top_probability(logits)[rows].cpu().numpy(),
                            unique_argmax.cpu().numpy()))

    def _columns(self) -> tuple[np.ndarray, ...]:
        if not self._parts:
            return (np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros(0, dtype=np.float32),
                    np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool))
        return tuple(np.concatenate(column) for column in zip(*self._parts))

    @property
    def entropies(self) -> np.ndarray:
        return self._columns()[3]

    def running_confidence(self) -> np.ndarray:
        """Per recorded step, the mean top-token probability over the answer's steps so far (the c_t of
        `ConfidenceTemperature`), in the order of `entropies`."""
        questions, samples, steps, _, top, _ = self._columns()
        order = np.lexsort((steps, samples, questions))
        key = np.stack([questions[order], samples[order]], axis=1)
        start = np.ones(len(order), dtype=bool)
        start[1:] = (key[1:] != key[:-1]).any(axis=1)
        group = np.cumsum(start) - 1
        sums = np.cumsum(top[order].astype(float))
        offsets = np.concatenate([[0.0], sums])[np.flatnonzero(start)][group]
        counts = np.arange(len(order)) - np.flatnonzero(start)[group] + 1
        confidence = np.empty(len(order))
        confidence[order] = (sums - offsets) / counts
        return confidence

    def rows_to_redraw(self, processor, low_temperature: float | None = None) -> list[tuple[int, int]]:
        """Sampled answers (i, j >= 0), sorted, that `processor` (either reading) could decode
        differently: a step where it fires and the chosen token was not the unique argmax (low
        temperature 0), or any step where it fires (low temperature > 0, where the low branch
        reshapes the distribution). Before that step the answer's prefix is the one recorded, so the
        processor's decisions there are the recorded ones; every other answer takes the same tokens
        under it, because the sampler's random stream of an answer does not depend on the processors.
        A number for `processor` means `AdaptiveTemperature(processor, low_temperature=...)`."""
        if not isinstance(processor, _TwoBranchTemperature):
            processor = AdaptiveTemperature(processor, low_temperature=low_temperature or 0.0)
        questions, samples, _, _, _, unique_argmax = self._columns()
        risky = processor.fires_in(self) & ((processor.low_temperature > 0) | ~unique_argmax) & (samples >= 0)
        return sorted({(int(i), int(j)) for i, j in zip(questions[risky], samples[risky])})

    def low_steps(self, processor, skip=()) -> tuple[int, int]:
        """(steps where `processor` fires, all steps) over the answers not in `skip`. A number for
        `processor` means `AdaptiveTemperature(processor)`."""
        if not isinstance(processor, _TwoBranchTemperature):
            processor = AdaptiveTemperature(processor)
        questions, samples, *_ = self._columns()
        skip = set(skip)
        keep = np.array([(int(i), int(j)) not in skip for i, j in zip(questions, samples)], dtype=bool)
        return int((processor.fires_in(self)[keep]).sum()), int(keep.sum())


def _replay(model, tokenizer, dataset, plain, trace, processor, *, num_samples, sampling, scoring):
    """(table, raw), fire rate and share redrawn of `processor` on one split, from its plain pass:
    only the answers it could change are decoded again (`StepTrace.rows_to_redraw`)."""
    table, raw = plain
    rows = trace.rows_to_redraw(processor)
    samples = [list(row) for row in raw["samples"]]
    ids = sample_rows(model, tokenizer, list(dataset["question"]), rows, logits_processors=[processor], **sampling)
    for (i, j), text in zip(rows, answer_texts(tokenizer, ids)):
        samples[i][j] = text
    scored = score_samples(dataset, list(table["greedy"]), samples, **scoring)
    fired, steps = trace.low_steps(processor, skip=rows)
    total = processor.steps + steps
    return scored, (processor.fired + fired) / total if total else float("nan"), len(rows) / max(1, len(dataset) * num_samples)


@renamed_arguments(lam="ed_weight")
def evaluate_adaptive(model, tokenizer, splits, *, readings: Sequence[str] = ("entropy", "confidence"),
                      calibrate_on: str = "retain", quantile: float = 0.05, confidence_threshold: float = 0.9,
                      low_temperature: float = 0.0, temperature: float = 1.0, num_samples: int, max_new_tokens: int,
                      top_p: float = 1.0, alpha: float = bounds.ALPHA, leak_tau: float = 0.5,
                      ed_weight: float = bounds.ED_WEIGHT, seed: int = 0, batch_size: int | None = None,
                      progress: bool = True, replay: bool = True, sweep: dict | None = None) -> dict:
    """`probabilistic.evaluate_model` of one model plainly and under each reading of adaptive
    temperature (`READINGS`: "entropy", h_τ calibrated as the `quantile` of the entropies recorded
    on the `calibrate_on` split; "confidence", c_T = `confidence_threshold`), per split (SPEC §2).
    Every pass uses the same seed, so an answer differs only after the low branch has fired in it.

    `replay=True` (default) decodes again only the answers a reading could change
    (`StepTrace.rows_to_redraw`) and keeps the plain answer of every other one, which is the answer
    a full second pass gives; the fire rates count the kept answers' steps from the plain pass.
    `replay=False` runs full passes (the tests check that both agree). Caveat as in `sampling`: in
    bfloat16, a full pass may differ on a few answers where the batch shape changes the rounding.

    `sweep`: other settings of the readings, replayed from the same plain pass (a calibration
    curve): {"entropy": [quantiles], "confidence": [c_T values]}; each becomes one entry of
    `result["sweep"]`: {'reading', 'setting' (the quantile or c_T), 'threshold' (h_τ or c_T),
    'tables': {split: table}, 'fire_rate': {split: ...}, 'redrawn': {split: ...}}.

    Returns {'plain': {split: (table, raw)}, 'adaptive': {reading: {split: (table, raw)}},
    'threshold': {reading: h_τ or c_T}, 'quantile', 'fire_rate': {reading: {split: share of decoding
    steps in the low branch}}, 'redrawn': {reading: {split: share of sampled answers decoded again
    (1.0 without replay)}}, 'entropies': {split: per-step entropies of the plain pass}, 'sweep'}. The
    statistics count the decoded answers: the sampled ones, and the greedy answer of each question
    (1 of n + 1) where it is decoded beside them (an engine, or a float32 model; a bfloat16 model's
    greedy answers are decoded apart, in float32); greedy answers are the same in every pass (the
    low branch keeps the argmax)."""
    sweep = dict(sweep or {})
    unknown = sorted((set(readings) | set(sweep)) - set(READINGS))
    if unknown:
        raise ValueError(f"unknown readings {unknown}; choose from {sorted(READINGS)}")
    if calibrate_on not in splits:
        raise ValueError(f"calibrate_on={calibrate_on!r} is not one of the splits {list(splits)}")
    if sweep and not replay:
        raise ValueError("sweep replays the plain pass: it needs replay=True")
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    batch_size=batch_size, progress=progress)
    scoring = dict(alpha=alpha, leak_tau=leak_tau, ed_weight=ed_weight)
    plain, traces = {}, {}
    for name, dataset in splits.items():
        traces[name] = StepTrace()
        plain[name] = evaluate_model(model, tokenizer, {name: dataset}, num_samples=num_samples, step_observer=traces[name],
                                     **sampling, **scoring)[name]
    entropies = {name: trace.entropies for name, trace in traces.items()}
    threshold_of = {"entropy": lambda q: threshold_from_entropies(entropies[calibrate_on], q)["threshold"],
                    "confidence": float}
    thresholds = {"entropy": threshold_of["entropy"](quantile), "confidence": threshold_of["confidence"](confidence_threshold)}
    adaptive, fire_rate, redrawn = {}, {}, {}
    for reading in readings:
        adaptive[reading], fire_rate[reading], redrawn[reading] = {}, {}, {}
        for name, dataset in splits.items():
            processor = READINGS[reading](thresholds[reading], low_temperature=low_temperature, temperature=temperature)
            if not replay:
                adaptive[reading][name] = evaluate_model(model, tokenizer, {name: dataset}, num_samples=num_samples,
                                                         logits_processors=[processor], **sampling, **scoring)[name]
                fire_rate[reading][name], redrawn[reading][name] = processor.fire_rate, 1.0
                continue
            adaptive[reading][name], fire_rate[reading][name], redrawn[reading][name] = _replay(
                model, tokenizer, dataset, plain[name], traces[name], processor, num_samples=num_samples,
                sampling=sampling, scoring=scoring)
    swept = []
    for reading, settings in sweep.items():
        for setting in settings:
            threshold = threshold_of[reading](setting)
            entry = {"reading": reading, "setting": float(setting), "threshold": float(threshold),
                     "tables": {}, "fire_rate": {}, "redrawn": {}}
            for name, dataset in splits.items():
                processor = READINGS[reading](threshold, low_temperature=low_temperature, temperature=temperature)
                (table, _), entry["fire_rate"][name], entry["redrawn"][name] = _replay(
                    model, tokenizer, dataset, plain[name], traces[name], processor, num_samples=num_samples,
                    sampling=sampling, scoring=scoring)
                entry["tables"][name] = table
            swept.append(entry)
    return {"plain": plain, "adaptive": adaptive, "threshold": {r: thresholds[r] for r in readings},
            "quantile": quantile, "fire_rate": fire_rate, "redrawn": redrawn, "entropies": entropies, "sweep": swept}
