"""Drawing tokens exactly (SPEC §5): a counter-based random stream per answer, keyed by (seed,
question, sample index), and the exponential race (Gumbel-max trick) in two levels over the
vocabulary, with temperature and the top-p nucleus. `sampling` decodes with these; every answer's
random numbers depend on its key and step only, never on the batch it is decoded in.

How a token is drawn (an exponential race with counter-based random numbers)
---------------------------------------------------------------------------
Row (question q, sample j) at decoding step t draws its random numbers from a counter-based
stream: draw c is SplitMix64(key + counter * gamma) with key a BLAKE2b hash of (seed, question
text, j) (SplitMix64: Steele, Lea, Flood 2014), so the stream of a row is a pure function of its
key and needs no state. The token is argmax_v p_v / E_v with E_v ~ Exp(1) i.i.d. (the exponential
race, i.e. the Gumbel-max trick), which picks v with probability p_v / Σ p exactly. It runs in two
levels: a race between 256-token blocks weighted by their mass, then a race inside the winning
block, so a step needs 448 random numbers per row instead of one per vocabulary token (`race`).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment (2**64 / golden ratio)
RACE_BLOCK = 256  # vocabulary block of the two-level cumulative sum
TOP_P_CANDIDATES = (256, 4096)  # candidates for the nucleus, tried in turn before a full sort


# ----------------------------------------------------------------------------- random numbers: a stream per (seed, question, sample)
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 output function (a bijective 64-bit mixer), on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_keys(seed: int, questions: Sequence[str], sample_indices: Sequence[int]) -> np.ndarray:
    """The 64-bit key of each row's random stream: a BLAKE2b hash of (seed, question text, sample
    index), so the stream of answer j to a question never depends on what else is decoded."""
    keys = [hashlib.blake2b(f"{seed}\x00{j}\x00{q}".encode(), digest_size=8).digest()
            for q, j in zip(questions, sample_indices)]
    return np.array([int.from_bytes(k, "little") for k in keys], dtype=np.uint64)


def race_noise(keys: np.ndarray, step: int, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Exp(1) noise of decoding step `step` for rows with the given keys: (rows x num_blocks) for
    the race between vocabulary blocks and (rows x RACE_BLOCK) for the race inside the chosen block.
    Draw c of step t of a row is SplitMix64(key + (t * (num_blocks + RACE_BLOCK) + c + 1) * gamma),
    turned into a uniform u in (0, 1) (53 bits) and into -log(u)."""
    width = num_blocks + RACE_BLOCK
    counters = np.arange(step * width + 1, (step + 1) * width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.asarray(keys, dtype=np.uint64)[:, None] + counters[None, :] * GAMMA)
    noise = -np.log(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)
    return noise[:, :num_blocks], noise[:, num_blocks:]


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The logical right shift of int64 `x` read as uint64 (torch's >> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def device_keys(keys: np.ndarray, device) -> torch.Tensor:
    """The uint64 keys of `row_keys` as an int64 tensor (the same bits) on `device`, for
    `race_noise_on_device`."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64)).to(device)


def race_noise_on_device(keys: torch.Tensor, step: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`race_noise` computed where `keys` (from `device_keys`) live, with no copy from the host: on a
    GPU the host's noise would be a copy (and a wait for the device) at every step. SplitMix64 runs on
    int64 (multiplication wraps as on uint64; right shifts are made logical), so the random bits are
    those of `race_noise` bit for bit, and the noise agrees with it to one rounding of float64's
    logarithm (torch's and numpy's may differ in the last bit)."""
    bits = race_bits_on_device(keys, step, num_blocks + RACE_BLOCK)
    noise = -torch.log((_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53)
    return noise[:, :num_blocks], noise[:, num_blocks:]


def race_bits_on_device(keys: torch.Tensor, step: int, width: int) -> torch.Tensor:
    """The random bits of `width` draws per row at decoding step `step` (int64 holding the uint64
    bits of `race_noise`'s SplitMix64 outputs)."""
    counters = torch.arange(step * width + 1, (step + 1) * width + 1, dtype=torch.int64, device=keys.device)
    x = keys[:, None] + counters[None, :] * _signed(int(GAMMA))
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


# ----------------------------------------------------------------------------- one sampling step


NO_FINITE_LOGIT = "a row of scores has no finite logit (all -inf or NaN): check the logits processors"


def race(probs: torch.Tensor, keys: np.ndarray | torch.Tensor, step: int, rows: torch.Tensor | None = None,
         invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Index drawn with probability probs[r, v] / probs[r].sum() for each answer: the exponential
    race (Gumbel-max trick), argmax_v probs[v] / E_v with E_v ~ Exp(1) i.i.d., in two levels.
    First a race between blocks of RACE_BLOCK tokens, weighted by the block's mass, then a race
    between the tokens of the winning block: P(v) = (M_b / M) (p_v / M_b) = p_v / M. Two levels
    need 448 random numbers per answer and step instead of one per vocabulary token.
    `rows[k]`: the row of `probs` that answer k (random stream `keys[k]`) draws from (default: row k);
    answers with the same prefix share a row of probabilities, never their random numbers.
    `keys`: the uint64 keys (noise computed on the host) or `device_keys` (noise computed where they
    live, `race_noise_on_device`). A row without finite mass raises, or with `invalid` (a boolean
    tensor, one per answer) is marked there instead, so that nothing waits for the device."""
    num_rows, vocab = probs.shape
    pad = (-vocab) % RACE_BLOCK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    blocks = probs.view(num_rows, -1, RACE_BLOCK)
    mass = blocks.sum(dim=2).double()  # rows x blocks
    if invalid is None:
        if not torch.isfinite(mass).all() or not (mass.sum(dim=1) > 0).all():
            raise ValueError(NO_FINITE_LOGIT)
    else:
        bad = ~(torch.isfinite(mass).all(dim=1) & (mass.sum(dim=1) > 0))
        invalid |= bad if rows is None else bad[rows]
    if isinstance(keys, torch.Tensor):
        block_noise, token_noise = race_noise_on_device(keys, step, blocks.shape[1])
    else:
        block_noise, token_noise = (torch.from_numpy(x).to(probs.device) for x in race_noise(keys, step, blocks.shape[1]))
    if rows is None:  # answer k draws from row k
        rows = torch.arange(num_rows, device=probs.device)
        block = (mass / block_noise).argmax(dim=1)
    else:
        block = (mass[rows] / block_noise).argmax(dim=1)
    inside = blocks[rows, block].double()
    return block * RACE_BLOCK + (inside / token_noise).argmax(dim=1)


def draw(scores: torch.Tensor, rows: torch.Tensor | None, keys: np.ndarray | torch.Tensor, step: int, *,
         temperature: float, top_p: float, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """One token per answer k from softmax(scores[rows[k]] / temperature) truncated to the top-p
    nucleus, with random stream keys[k]; the softmax and the nucleus are computed once per row used.
    `rows` None: answer k draws from row k. With `invalid` (see `race`) and `rows` None nothing here
    waits for the device: no `unique`, and the nucleus from a full sort (`sorted_nucleus_floor`,
    the same floor as `nucleus_floor`'s candidates)."""
    local = None
    if rows is not None:
        used, local = torch.unique(rows, return_inverse=True)
        if len(used) < scores.shape[0]:  # else every row is used (`used` is sorted): no copy
            scores = scores.index_select(0, used)  # whole rows: faster than scores[used], the same numbers
    if temperature != 1.0:
        scores = scores.to(torch.float32, copy=True).div_(temperature)  # never the caller's logits in place
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # one fused pass over the vocabulary
    if top_p < 1.0:
        floor = nucleus_floor(probs, top_p) if invalid is None else sorted_nucleus_floor(probs, top_p)
        probs.masked_fill_(~(probs >= floor[:, None]), 0.0)  # torch.where's numbers, in place: probs is our own
    return race(probs, keys, step, local, invalid=invalid)


def next_token(scores: torch.Tensor, keys: np.ndarray, step: int, *, temperature: float = 1.0,
               top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row from softmax(scores / temperature) truncated to the top-p nucleus,
    with the random streams `keys` (one per row, see `row_keys`) at decoding step `step`.
    `scores`: logits (float32 after the logits processors, or the model's own dtype: the softmax
    is always computed in float32). temperature == 0 returns the argmax (greedy)."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    return draw(scores, torch.arange(scores.shape[0], device=scores.device), keys, step, temperature=temperature,
                 top_p=top_p)


def nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, the probability of the least likely token of the nucleus: the most likely tokens,
    in descending order, up to and including the first one at which their probability reaches
    top_p (tokens tied with it are kept too). The candidates are the top 256 tokens (`topk`, no
    sort of the vocabulary); rows whose nucleus is larger try the top 4096, and only rows still
    not covered are sorted in full."""
    rows, vocab = probs.shape
    total = probs.sum(dim=1).double()
    if not torch.isfinite(total).all() or not (total > 0).all():
        raise ValueError(NO_FINITE_LOGIT)
    floor = torch.empty(rows, dtype=probs.dtype, device=probs.device)
    pending = torch.arange(rows, device=probs.device)
    for k in (*TOP_P_CANDIDATES, vocab):
        k = min(k, vocab)
        rest = probs if len(pending) == rows else probs.index_select(0, pending)  # no copy of every row
        top = rest.topk(k, dim=1).values if k < vocab else rest.sort(dim=1, descending=True).values
        cdf = top.double().cumsum(dim=1) / total[pending, None]
        covered = (cdf[:, -1] >= top_p) | (k == vocab)
        # keep rank r iff the mass strictly before it is < top_p (always the top token)
        before = torch.nn.functional.pad(cdf[:, :-1], (1, 0))
        size = (before < top_p).sum(dim=1).clamp(min=1)
        floor[pending[covered]] = top.gather(1, (size - 1)[:, None])[:, 0][covered]
        pending = pending[~covered]
        if pending.numel() == 0:
            break
    return floor


def sorted_nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`nucleus_floor` from one full sort of every row: the same floor, with no step that depends on
    the data's values (what a GPU runs without waiting for it). No check of the rows' mass: a row
    without finite mass gets a NaN floor, which `race(invalid=...)` marks."""
    top = probs.sort(dim=1, descending=True).values
    cdf = top.double().cumsum(dim=1) / probs.sum(dim=1).double()[:, None]
    before = torch.nn.functional.pad(cdf[:, :-1], (1, 0))
    size = (before < top_p).sum(dim=1).clamp(min=1)
    return top.gather(1, (size - 1)[:, None])[:, 0]
