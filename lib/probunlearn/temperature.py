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

from probunlearn.sampling import sample_token_ids

__all__ = ["next_token_entropy", "EntropyRecorder", "AdaptiveTemperature", "calibrate_threshold",
           "threshold_from_entropies", "evaluate_adaptive"]


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


def evaluate_adaptive(model, tokenizer, splits, *, calibrate_on: str = "retain", quantile: float = 0.05,
                      low_temperature: float = 0.0, temperature: float = 1.0, **evaluate_kwargs) -> dict:
    """`probabilistic.evaluate_model` of one model twice, per split: plain sampling (recording the
    next-token entropy of every step), then with `AdaptiveTemperature`, h_τ calibrated as the
    `quantile` of the entropies recorded on the `calibrate_on` split (SPEC §2). Both passes use
    the same seed, so an answer differs only after the low branch has fired in it.

    Returns {'plain': {split: (table, raw)}, 'adaptive': {split: (table, raw)}, 'threshold',
    'quantile', 'fire_rate': {split: share of decoding steps in the low branch},
    'entropies': {split: per-step entropies of the plain pass}}. The statistics count every
    decoded row, the greedy row of each question included (1 of n + 1); greedy answers are the
    same in both passes (the low branch keeps the argmax)."""
    from probunlearn.probabilistic import evaluate_model

    if calibrate_on not in splits:
        raise ValueError(f"calibrate_on={calibrate_on!r} is not one of the splits {list(splits)}")
    plain, entropies = {}, {}
    for name, dataset in splits.items():
        recorder = EntropyRecorder()
        plain[name] = evaluate_model(model, tokenizer, {name: dataset}, temperature=temperature,
                                     logits_processors=[recorder], **evaluate_kwargs)[name]
        entropies[name] = recorder.entropies
    calibration = threshold_from_entropies(entropies[calibrate_on], quantile)
    adaptive, fire_rate = {}, {}
    for name, dataset in splits.items():
        processor = AdaptiveTemperature(calibration["threshold"], low_temperature=low_temperature,
                                        temperature=temperature)
        adaptive[name] = evaluate_model(model, tokenizer, {name: dataset}, temperature=temperature,
                                        logits_processors=[processor], **evaluate_kwargs)[name]
        fire_rate[name] = processor.fire_rate
    return {"plain": plain, "adaptive": adaptive, "threshold": calibration["threshold"], "quantile": quantile,
            "fire_rate": fire_rate, "entropies": entropies}
