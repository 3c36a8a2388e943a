"""The interface of logits processors and step observers, which `sampling` calls at every decoding step
(SPEC §5): what they see, in which order, and what a row-aware processor is told (`DecodingStep`).
Adaptive temperature (`temperature`) is written against it.

Order of operations at each step (documented for `logits_processors`):
1. the model's next-token logits for every distinct prefix still generating, cast to float32
   ("raw logits");
2. each processor in turn, as in transformers `scores = processor(input_ids, scores)`, where
   `input_ids` are the prefixes' prompt (left-padded with the pad token) followed by the tokens
   generated so far; a processor sees raw, unscaled logits, one row per distinct prefix that still
   has answers. A *row-aware* processor (`row_aware = True`) is called
   `processor(input_ids, scores, info)` with a `DecodingStep`: the step, how many answers each row
   stands for (so its statistics count answers) and its own per-row state, which the sampler
   carries along with the rows (`temperature.ConfidenceTemperature` keeps a running confidence
   per answer this way);
3. division by `temperature` (temperature 0: argmax, i.e. greedy decoding);
4. top-p: the smallest set of most likely tokens whose probability reaches `top_p`
   (Holtzman et al. 2020); found with `topk` on 256 candidates, then 4096 for rows whose
   nucleus is larger, and a full sort only for rows whose nucleus is larger still;
5. for each answer, the two-level exponential race (`draws`) with its own random numbers.
A processor that wants a row decoded greedily (e.g. adaptive temperature, SPEC §2) sets every other
token to -inf: that survives steps 3-5 for any temperature and top-p.
A `step_observer` (optional) is called after step 5 with the question and sample index of each
answer still generating, the step, the raw logits of step 1 (one row per distinct prefix), the
prefix row of each answer and the chosen tokens; it must not change them
(`temperature.evaluate_adaptive` uses it to see which answers a processor could change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

LogitsProcessor = Callable[..., torch.Tensor]
# (question indices, sample indices, step, raw logits of the distinct prefixes, prefix row of each
# answer, chosen tokens) of the answers still generating
StepObserver = Callable[[np.ndarray, np.ndarray, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class DecodingStep:
    """What a row-aware logits processor (`row_aware = True`) is told at each decoding step, besides
    `input_ids` and `scores`: the processor is called `processor(input_ids, scores, info)`.

    - `step`: the decoding step (0: the first answer token);
    - `weights`: how many answers each row stands for (rows are distinct prefixes; answers with the
      same prefix are decoded once), so per-step statistics can count answers, not rows;
    - `state`: the processor's own per-row state (a tensor, rows first; `initial_state(rows)` makes it
      for the prompts), which it reads and replaces (`info.state = ...`). The sampler carries it with
      the rows: a prefix that continues with two different tokens passes it to both, and a finished
      answer drops it. State is therefore a function of the answer's own prefix, so answers never
      depend on `batch_size` or on the other answers of the batch."""

    step: int
    weights: torch.Tensor
    state: torch.Tensor | None = None


def row_aware(processor) -> bool:
    """Whether `processor` takes a `DecodingStep` as its third argument (`row_aware = True`)."""
    return bool(getattr(processor, "row_aware", False))
