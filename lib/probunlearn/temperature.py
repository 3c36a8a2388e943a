"""Adaptive temperature scaling at sampling time ([P1] Scholten et al., ICLR 2025, §5; SPEC §2).

[P1] pairs entropy optimisation (`unlearning.entropy_regulariser`: push the next-token entropy
down on forget questions) with *adaptive temperature scaling*: where the model is confident, sample
at a low temperature, so that the low-entropy forget answers are decoded as greedily as they are
evaluated. The paper names the idea; its public code has no implementation, so this is our stated
reading (SPEC §2):

- at every decoding step, H_t = -Σ_v p_v log p_v of the model's next-token distribution (the raw
  logits, temperature 1);
- if H_t < h_τ, sample at `low_temperature` (default 0: the argmax), else at the normal temperature;
- h_τ is the `quantile` (default 5 %) of the per-step entropies the same model shows when it
  samples answers to *retain* questions (`calibrate_threshold`), so retain sampling is unchanged
  in ≥ 95 % of its steps.

`AdaptiveTemperature` is a logits processor for `sampling.sample_answers` (it sees raw logits,
before the sampler divides by the temperature) and counts how often its low branch fires, so a
notebook can report the rate on forget vs retain questions. Used by notebook 04.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probunlearn import bounds
from probunlearn.sampling import answer_texts, sample_rows, sample_token_ids

__all__ = ["next_token_entropy", "EntropyRecorder", "AdaptiveTemperature", "calibrate_threshold",
           "threshold_from_entropies", "StepTrace", "evaluate_adaptive"]


def next_token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(scores) per row, in float32; -inf logits contribute nothing."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)


class EntropyRecorder:
    """A logits processor that changes nothing and records the next-token entropy of every row at
    every step (`entropies`, a 1-D array). The sampler passes only rows still generating."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._chunks.append(next_token_entropy(scores).cpu().numpy())
        return scores

    @property
    def entropies(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)


class AdaptiveTemperature:
    """Logits processor: rows whose next-token entropy is below `threshold` (h_τ) are sampled at
    `low_temperature` instead of the sampler's `temperature`.

    The sampler divides what this returns by `temperature`, so a low row's logits are multiplied
    by temperature / low_temperature (net effect: logits / low_temperature); low_temperature = 0
    keeps only the most likely token(s), i.e. greedy decoding, whatever the sampler's temperature
    and top-p. `fired` / `steps` count low rows / all rows seen; `fire_rate` is their ratio;
    `reset()` zeroes them (one processor per split gives per-split rates)."""

    def __init__(self, threshold: float, *, low_temperature: float = 0.0, temperature: float = 1.0):
        if not np.isfinite(threshold):
            raise ValueError(f"threshold h_tau must be a finite entropy in nats, got {threshold!r}")
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

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        low = next_token_entropy(scores) < self.threshold
        self.fired += int(low.sum())
        self.steps += int(low.numel())
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


def calibrate_threshold(model, tokenizer, retain_questions: Sequence[str], *, quantile: float = 0.05,
                        n: int = 16, max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
                        seed: int = 0, batch_size: int | None = None, progress: bool = True) -> dict:
    """h_τ for `AdaptiveTemperature`: the `quantile` of the next-token entropies of `model` over
    every decoding step of `n` sampled answers to each retain question (SPEC §2). Returns
    {'threshold', 'quantile', 'steps', 'entropies'}."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), e.g. 0.05, got {quantile!r}")
    recorder = EntropyRecorder()
    sample_token_ids(model, tokenizer, list(retain_questions), n=n, temperature=temperature, top_p=top_p,
                     max_new_tokens=max_new_tokens, seed=seed, logits_processors=[recorder],
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
    every decoded row (question i, sample j) and step, the next-token entropy of the raw logits and
    whether the chosen token was their unique argmax. That is enough to know, for any h_τ, which
    answers `AdaptiveTemperature` could change (`rows_to_redraw`) and how often it would fire on the
    others (`low_steps`), without decoding them again. `entropies` lists every step's entropy in the
    order an `EntropyRecorder` would."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, questions: np.ndarray, samples: np.ndarray, step: int, logits: torch.Tensor,
                 tokens: torch.Tensor) -> None:
        top = logits.float().topk(2, dim=-1)
        unique_argmax = (tokens == top.indices[:, 0]) & (top.values[:, 0] > top.values[:, 1])
        self._parts.append((np.asarray(questions), np.asarray(samples), next_token_entropy(logits).cpu().numpy(),
                            unique_argmax.cpu().numpy()))

    def _columns(self):
        if not self._parts:
            return (np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool))
        return tuple(np.concatenate(column) for column in zip(*self._parts))

    @property
    def entropies(self) -> np.ndarray:
        return self._columns()[2]

    def rows_to_redraw(self, threshold: float, low_temperature: float = 0.0) -> list[tuple[int, int]]:
        """Sampled rows (i, j >= 0), sorted, that `AdaptiveTemperature(threshold, low_temperature)`
        could decode differently: a step below `threshold` at which the chosen token was not the
        unique argmax (low_temperature 0), or any step below it (low_temperature > 0, where the
        low branch reshapes the distribution). Every other row takes the same tokens under it,
        because the sampler's random stream of a row does not depend on the processors."""
        questions, samples, entropies, unique_argmax = self._columns()
        risky = (entropies < threshold) & ((low_temperature > 0) | ~unique_argmax) & (samples >= 0)
        return sorted({(int(i), int(j)) for i, j in zip(questions[risky], samples[risky])})

    def low_steps(self, threshold: float, skip=()) -> tuple[int, int]:
        """(steps below `threshold`, all steps) over the rows not in `skip`."""
        questions, samples, entropies, _ = self._columns()
        skip = set(skip)
        keep = np.array([(int(i), int(j)) not in skip for i, j in zip(questions, samples)], dtype=bool)
        return int((entropies[keep] < threshold).sum()), int(keep.sum())


def evaluate_adaptive(model, tokenizer, splits, *, calibrate_on: str = "retain", quantile: float = 0.05,
                      low_temperature: float = 0.0, temperature: float = 1.0, num_samples: int, max_new_tokens: int,
                      top_p: float = 1.0, alpha: float = bounds.ALPHA, leak_tau: float = 0.5, lam: float = bounds.LAM,
                      seed: int = 0, batch_size: int | None = None, progress: bool = True, replay: bool = True) -> dict:
    """`probabilistic.evaluate_model` of one model twice, per split: plain sampling (recording the
    next-token entropy of every step), then with `AdaptiveTemperature`, h_τ calibrated as the
    `quantile` of the entropies recorded on the `calibrate_on` split (SPEC §2). Both passes use
    the same seed, so an answer differs only after the low branch has fired in it.

    `replay=True` (default) decodes again only the answers the low branch could change
    (`StepTrace.rows_to_redraw`: usually few, since it fires where the model is nearly certain)
    and keeps the plain answer of every other row, which is the answer a full second pass gives;
    the fire rates count the kept rows' steps from the plain pass. `replay=False` runs the full
    second pass (the tests check that both agree). Caveat as in `sampling`: in bfloat16, a full
    pass may differ on a few answers where the batch shape changes the rounding.

    Returns {'plain': {split: (table, raw)}, 'adaptive': {split: (table, raw)}, 'threshold',
    'quantile', 'fire_rate': {split: share of decoding steps in the low branch}, 'redrawn': {split:
    share of sampled answers decoded again (1.0 without replay)}, 'entropies': {split: per-step
    entropies of the plain pass}}. The statistics count every decoded row, the greedy row of each
    question included (1 of n + 1); greedy answers are the same in both passes (the low branch
    keeps the argmax)."""
    from probunlearn.probabilistic import evaluate_model, score_samples

    if calibrate_on not in splits:
        raise ValueError(f"calibrate_on={calibrate_on!r} is not one of the splits {list(splits)}")
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    batch_size=batch_size, progress=progress)
    scoring = dict(alpha=alpha, leak_tau=leak_tau, lam=lam)
    plain, traces = {}, {}
    for name, dataset in splits.items():
        traces[name] = StepTrace()
        plain[name] = evaluate_model(model, tokenizer, {name: dataset}, num_samples=num_samples, step_observer=traces[name],
                                     **sampling, **scoring)[name]
    entropies = {name: trace.entropies for name, trace in traces.items()}
    calibration = threshold_from_entropies(entropies[calibrate_on], quantile)
    threshold = calibration["threshold"]
    adaptive, fire_rate, redrawn = {}, {}, {}
    for name, dataset in splits.items():
        processor = AdaptiveTemperature(threshold, low_temperature=low_temperature, temperature=temperature)
        if not replay:
            adaptive[name] = evaluate_model(model, tokenizer, {name: dataset}, num_samples=num_samples,
                                            logits_processors=[processor], **sampling, **scoring)[name]
            fire_rate[name], redrawn[name] = processor.fire_rate, 1.0
            continue
        table, raw = plain[name]
        rows = traces[name].rows_to_redraw(threshold, low_temperature)
        samples = [list(row) for row in raw["samples"]]
        ids = sample_rows(model, tokenizer, list(dataset["question"]), rows, logits_processors=[processor], **sampling)
        for (i, j), text in zip(rows, answer_texts(tokenizer, ids)):
            samples[i][j] = text
        adaptive[name] = score_samples(dataset, list(table["greedy"]), samples, **scoring)
        fired, steps = traces[name].low_steps(threshold, skip=rows)
        fire_rate[name] = (processor.fired + fired) / (processor.steps + steps) if processor.steps + steps else float("nan")
        redrawn[name] = len(rows) / max(1, len(dataset) * num_samples)
    return {"plain": plain, "adaptive": adaptive, "threshold": threshold, "quantile": quantile,
            "fire_rate": fire_rate, "redrawn": redrawn, "entropies": entropies}
