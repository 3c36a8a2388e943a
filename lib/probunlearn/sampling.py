"""Decoding: exact, reproducible, fast sampling of many answers per question, and greedy answers.

SPEC §5 ([P1] Scholten et al., ICLR 2025, §4): the probabilistic evaluation draws n answers per
question from the model's output distribution at temperature T with top-p truncation, and bounds
what leaks. The bounds are only as good as the samples, so the sampler must be

- **exact**: each new token is drawn from softmax(processed_logits / T) restricted to the top-p
  nucleus, renormalised, and from nothing else;
- **reproducible**: answer j to a question depends only on (seed, question text, j), never on
  `batch_size`, on which other questions share the batch, or on n (the first 8 of 64 samples are
  the 8 samples of n = 8);
- **fast**: see `benchmarks/README.md` for what each idea below gave on a 2-core CPU.

How a token is drawn: `draws` (an exponential race with counter-based random numbers, exact and keyed
per answer).

What a logits processor or step observer sees at each step, and in which order: `processors`.

Decoding
--------
Each batch holds up to `batch_size` answers (question, sample). Its distinct prompts are run once
(left-padded, so several questions share a forward pass). Then one token per step: the rows of
the forward pass are the batch's *distinct prefixes*, not its answers. Answers whose prompt and
tokens so far agree have the same next-token distribution, so it is computed once and each answer
draws from it with its own random numbers; a prefix that two answers continue differently becomes
two rows (the key/value cache row is copied). This is exact: only compute is shared, never a
random number. It saves little on a base model, whose samples part after a few tokens, and most
of the work on a fine-tuned model, which repeats a memorised answer in most samples
(`benchmarks/README.md`). The key/value cache is allocated once (no concatenation per step);
a row whose answers all ended is taken at once by a new prefix or by a row from the end of the batch,
so that no row of the forward pass is left empty. On a CPU, a batch with
several answers per question keeps each prompt's keys and values once (`kv_cache.SharedPrompt`):
the attention reads them once per prompt, not once per answer. Weights run in the
dtype they were loaded in (bfloat16 on a CPU with AMX, see `hardware.default_dtype`);
the sampling math is float32 and float64. On a CPU, decoding steps compute attention as matrix
products (`attention.decode_attention`, what transformers' eager attention computes) rather than
with the fused kernel, whose per-task cost dominates for one query token, and large tensors are
served from a heap that keeps freed memory (`hardware.reuse_freed_memory`) instead of fresh pages.

On a GPU the loop is static (`_decode_static`, `loop="static"`): the rows above depend on the tokens
drawn, so each step of that loop reads values from the device, and a GPU would wait for itself at
every step. The static loop keeps one row per answer for the whole batch, makes the random numbers on
the device (`draws.race_noise_on_device`, the host's random bits) and looks at which answers ended
only every `STATIC_CHECK_EVERY` steps; it draws the same answers (the tests).

What "independent of batch_size" means in bfloat16: the random numbers of every answer and step
are the same whatever the batching, so two runs differ only where the model's logits differ. In
float32 the logits of a row change between batch shapes by ~1e-7 and answers are identical
(the tests check this bit for bit on a tiny float32 model). In bfloat16, matrix kernels round
differently for different batch shapes; when two candidates of the race are nearly tied, a
different rounding can change the winner, so a small share of answers differ.
Every answer is still an exact sample of the model at that batch shape. An 8-bit model (LLM.int8,
`quantization`) couples the rows of a batch: its products keep in full precision the feature columns
where any row of the batch exceeds the outlier threshold (Dettmers et al. 2022), so a row's logits,
and a share of its answers, change with the rows decoded beside it. Greedy answers are
decoded in float32 (`greedy_answers`), where an argmax is a tie far less often than in bfloat16,
so that notebooks that ask different sets of questions get the same greedy answer from a model.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from probunlearn import draws, memory
from probunlearn.attention import NAME as DECODE_ATTENTION
from probunlearn.attention import decoding_attention
from probunlearn.hardware import model_device, reuse_freed_memory
from probunlearn.kv_cache import SharedPrompt, cache_argument, kv_cache
from probunlearn.models import encode_prompt, full_precision, full_precision_changes, lean_lora
from probunlearn.processors import DecodingStep, LogitsProcessor, StepObserver, row_aware
from probunlearn.utils import renamed_arguments

__all__ = ["sample_answers", "sample_token_ids", "sample_rows", "greedy_answers", "greedy_and_sampled_answers",
           "answer_texts", "GREEDY"]

DEFAULT_ROWS = 512  # rows (question, sample) decoded together on a CPU; measured in benchmarks/README.md
SHARED_PROMPT_ROWS = 4  # answers per prompt from which a batch keeps each prompt's keys and values once
STATIC_CHECK_EVERY = 8  # `_decode_static`: steps between two looks of the host at which answers ended
LOOPS = ("auto", "prefix", "static")  # decoding loops: `_decode` (shared prefixes), `_decode_static`; auto:
# static on a GPU without a step observer, prefix elsewhere


# ---------------------------------------------------------------------------------------------
# batched decoding


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else source)
    return sorted(ids)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch on `device`: (token ids, attention mask, positions)."""
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        prompt_ids[i, width - len(ids):] = torch.tensor(ids)
        prompt_mask[i, width - len(ids):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    return prompt_ids, prompt_mask, (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)


def _processed(processors: Sequence[LogitsProcessor], states: dict, current: torch.Tensor, scores: torch.Tensor,
               info: DecodingStep, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """`scores` (of the decoding rows `rows`; `current`: their tokens so far) after the logits
    processors, in order. A row-aware processor with per-row state (`states[k]`, every row's) gets the
    state of these rows in `info` and its new state is written back."""
    for k, processor in enumerate(processors):
        if not row_aware(processor):
            scores = processor(current, scores)
            continue
        info.state = states[k][rows] if k in states else None
        scores = processor(current, scores, info)
        if k in states:
            states[k][rows] = info.state
    return scores


@torch.inference_mode()
def _decode(model, tokenizer, prompts: list[list[int]], row_prompt: list[int], keys: np.ndarray,
            greedy_rows: np.ndarray, *,
            max_new_tokens: int, temperature: float, top_p: float,
            logits_processors: Sequence[LogitsProcessor], eos_ids: list[int], on_step=None,
            observer=None) -> list[list[int]]:
    """Decode one batch of answers. `prompts`: distinct prompt token ids; `row_prompt[a]`: which
    prompt answer a continues; `keys[a]`: its random stream; `greedy_rows[a]`: answer a takes the
    argmax; `observer(answers, step, raw_logits, rows, tokens)`: called at each step with the
    answers still generating (indices into this batch), the raw logits of the distinct prefixes, the
    prefix row of each answer and the chosen tokens. Returns the generated ids of each answer, EOS
    excluded.

    Rows of the model's forward pass are the distinct prefixes, not the answers: answers whose
    prompt and tokens so far agree have the same next-token distribution, so it is computed once and
    each of them draws from it with its own random numbers (exact: nothing but compute is shared).
    A fine-tuned model that has memorised an answer repeats it in most samples, so this saves most
    of the work there."""
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_ids, prompt_mask, positions = _left_padded(prompts, pad_id, device)
    width = prompt_ids.shape[1]
    answers = len(row_prompt)
    # the prompts' keys and values kept once (kv_cache.SharedPrompt) where several answers continue
    # each prompt and the decoding attention is ours (a CPU); else every row holds its prompt
    shared = (getattr(model.config, "_attn_implementation", None) == DECODE_ATTENTION
              and answers >= SHARED_PROMPT_ROWS * len(prompts))
    cache = kv_cache(width if shared else width + max_new_tokens,
                     row_capacity=len(prompts) if shared else len(prompts) + answers)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    logits = out.logits[:, -1]
    shared_prompt = SharedPrompt(cache, max_new_tokens, len(prompts) + answers, prompt_mask) if shared else None
    step_arguments = {"shared_prompt": shared_prompt} if shared else {}

    # rows ("slots") of the forward pass: distinct prefixes; slot s continues prompt slot_prompt[s]
    slot_prompt = torch.arange(len(prompts), device=device)
    slot_pos = positions[:, -1] + 1
    sequences = None  # prompt + tokens of each slot, for the processors
    if logits_processors:
        sequences = torch.full((len(prompts), width + max_new_tokens), pad_id, dtype=torch.long, device=device)
        sequences[:, :width] = prompt_ids
    states = {k: p.initial_state(len(prompts), device) for k, p in enumerate(logits_processors)
              if row_aware(p) and hasattr(p, "initial_state")}
    # answers still generating: their index in the batch and their slot
    answer_index = torch.arange(answers)
    answer_slot = torch.tensor(row_prompt, device=device)
    greedy = torch.from_numpy(np.asarray(greedy_rows, dtype=bool) | (temperature == 0))
    generated = torch.full((answers, max_new_tokens), pad_id, dtype=torch.long)
    lengths = np.zeros(answers, dtype=np.int64)
    eos = torch.tensor(eos_ids, device=device)

    for step in range(max_new_tokens):
        scores = logits
        if logits_processors:  # processors see the slots that still have answers, not finished ones
            weights = torch.bincount(answer_slot, minlength=logits.shape[0])
            live = (weights > 0).nonzero()[:, 0]
            scores = logits.float()
            part = _processed(logits_processors, states, sequences[live, : width + step], scores[live],
                              DecodingStep(step=step, weights=weights[live]), live)
            scores = scores.index_copy(0, live, part)
        is_greedy = greedy[answer_index].to(device)
        tokens = torch.empty(len(answer_index), dtype=torch.long, device=device)
        if is_greedy.any():
            tokens[is_greedy] = scores.argmax(dim=-1)[answer_slot[is_greedy]]
        if not is_greedy.all():
            draw = ~is_greedy
            tokens[draw] = draws.draw(scores, answer_slot[draw], keys[answer_index[draw.cpu()].numpy()], step,
                                 temperature=temperature, top_p=top_p)
        if observer is not None:
            observer(answer_index.numpy(), step, logits, answer_slot, tokens)
        generated[answer_index, step] = tokens.cpu()
        lengths[answer_index.numpy()] += 1
        finished = torch.isin(tokens, eos)
        if on_step is not None:
            on_step(int(finished.sum()))
        if step == max_new_tokens - 1 or finished.all():
            break
        going = ~finished
        answer_index, answer_slot, tokens = answer_index[going.cpu()], answer_slot[going], tokens[going]

        # Regroup: each (slot, token) pair is a new prefix, and the slots become exactly these
        # prefixes, none left empty (an empty row would cost a row of compute at every step). The
        # first child of a slot keeps its cache row where that row stays (below the new number of
        # slots); every other child gets a copy of its parent's row in a row that left (its answers
        # ended, or it is past the new number) or in a row added. A copy costs one row of the cache.
        vocab = logits.shape[-1]
        children, inverse = torch.unique(answer_slot * vocab + tokens, return_inverse=True)
        parent, child_token = children // vocab, children % vocab
        slots = len(children)
        stays = torch.ones(slots, dtype=torch.bool, device=device)
        stays[1:] = parent[1:] != parent[:-1]  # first child of its parent
        stays &= parent < slots
        taken = torch.zeros(slots, dtype=torch.bool, device=device)
        taken[parent[stays]] = True
        movers, targets = (~stays).nonzero()[:, 0], (~taken).nonzero()[:, 0]  # as many of each
        child_slot = parent.clone()
        child_slot[movers] = targets
        moved = bool(len(movers)) or slots != logits.shape[0]  # the shared prompt's row order changes
        if moved:
            sources = parent[movers]
            for layer in cache.layers:
                layer.place_rows(slots, targets, sources)
            origin = torch.arange(slots, device=device)  # the slot whose prompt and position each slot takes
            origin[targets] = sources
            slot_prompt, slot_pos = slot_prompt[origin], slot_pos[origin]
            if sequences is not None:
                sequences = sequences[origin]
            states = {k: v[origin] for k, v in states.items()}
        answer_slot = child_slot[inverse]
        next_ids = torch.empty(slots, dtype=torch.long, device=device)
        next_ids[child_slot] = child_token
        if sequences is not None:
            sequences[child_slot, width + step] = child_token
        if shared_prompt is not None:  # the prompts' padding is the shared prompt's: no mask to build
            if moved:
                shared_prompt.set_rows(slot_prompt)
            mask = None
        else:
            mask = torch.cat([prompt_mask[slot_prompt], torch.ones((len(slot_prompt), step + 1), dtype=torch.long,
                                                                    device=device)], dim=1)
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=slot_pos[:, None], use_cache=True,
                    **cache_argument(model, cache), **step_arguments)
        logits = out.logits[:, -1]
        slot_pos = slot_pos + 1
    if on_step is not None:
        on_step(None)
    results = []
    eos_set = set(eos_ids)
    for a in range(answers):
        ids = generated[a, : lengths[a]].tolist()
        if ids and ids[-1] in eos_set:
            ids = ids[:-1]
        results.append(ids)
    return results


@torch.inference_mode()
def _decode_static(model, tokenizer, prompts: list[list[int]], row_prompt: list[int], keys: np.ndarray,
                   greedy_rows: np.ndarray, *, max_new_tokens: int, temperature: float, top_p: float,
                   logits_processors: Sequence[LogitsProcessor], eos_ids: list[int], on_step=None,
                   check_every: int | None = None, device_noise: bool | None = None) -> list[list[int]]:
    """`_decode` without waiting for the device: one row per answer for the whole batch (no prefix
    sharing, no rows dropped), the random numbers made on the device (`draws.race_noise_on_device`),
    tokens kept there, and a fixed attention mask sliced per step. The host learns how many answers
    have ended only every `check_every` steps (default `STATIC_CHECK_EVERY`), to stop early and move the
    progress bar; a GPU queues the steps in between without a synchronisation. Answers that ended
    keep decoding until then (what follows their EOS is dropped), which costs compute and changes
    nothing: each answer is the one
    `_decode` draws (the same random stream per answer and step; identical in float32, the tests).
    What `_run` uses on a GPU; a CPU gains more from `_decode`'s shared prefixes. `device_noise`: the
    random numbers made by torch where the model is (default: on a GPU; on a CPU numpy makes them)."""
    check_every = check_every or STATIC_CHECK_EVERY
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_ids, prompt_mask, positions = _left_padded(prompts, pad_id, device)
    width = prompt_ids.shape[1]
    answers = len(row_prompt)
    cache = kv_cache(width + max_new_tokens, row_capacity=max(answers, len(prompts)))
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    rows = torch.tensor(row_prompt, device=device)
    for layer in cache.layers:  # each answer's row holds a copy of its prompt's keys and values
        layer.keep_rows(rows)
    logits = out.logits[:, -1][rows]
    # attend to the prompt (not its padding) and every generated position, sliced to the cached length at
    # each step: for sdpa (a GPU's default) and ours a boolean 4-d mask, which transformers passes on as it
    # is; for other attentions the 2-d mask, from which transformers builds theirs (and may look at it)
    mask = torch.ones((answers, width + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask[rows]
    if getattr(model.config, "_attn_implementation", None) in ("sdpa", DECODE_ATTENTION):
        mask = mask.bool()[:, None, None, :]
    position = positions[rows, -1] + 1
    sequences = None
    if logits_processors:
        sequences = torch.full((answers, width + max_new_tokens), pad_id, dtype=torch.long, device=device)
        sequences[:, :width] = prompt_ids[rows]
    states = {k: p.initial_state(answers, device) for k, p in enumerate(logits_processors)
              if row_aware(p) and hasattr(p, "initial_state")}
    greedy_host = np.asarray(greedy_rows, dtype=bool) | (temperature == 0)
    greedy = torch.from_numpy(greedy_host).to(device)
    device_noise = device.type != "cpu" if device_noise is None else device_noise
    noise_keys = draws.device_keys(keys, device) if device_noise else keys
    generated = torch.full((answers, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(answers, dtype=torch.bool, device=device)
    invalid = torch.zeros(answers, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, device=device)
    counted = 0
    for step in range(max_new_tokens):
        scores = logits
        if logits_processors:  # every row, an answer that ended with weight 0 (its tokens are ignored)
            scores = _processed(logits_processors, states, sequences[:, : width + step], logits.float(),
                                DecodingStep(step=step, weights=(~done).long()))
        if greedy_host.all():
            tokens = scores.argmax(dim=-1)
        else:
            drawn = draws.draw(scores, None, noise_keys, step, temperature=temperature, top_p=top_p, invalid=invalid)
            tokens = torch.where(greedy, scores.argmax(dim=-1), drawn) if greedy_host.any() else drawn
        invalid &= ~done  # a row that ended may hold anything (its tokens after EOS are never read)
        generated[:, step] = tokens
        if sequences is not None:
            sequences[:, width + step] = tokens
        done |= torch.isin(tokens, eos)
        last = step == max_new_tokens - 1
        if last or (step + 1) % check_every == 0:  # the host waits for the device here only
            ended = int(done.sum())
            if on_step is not None and ended > counted:
                on_step(ended - counted)
            counted = ended
            if ended == answers:
                break
        if last:
            break
        out = model(input_ids=tokens[:, None], attention_mask=mask[..., : width + step + 1],
                    position_ids=(position + step)[:, None], use_cache=True, **cache_argument(model, cache))
        logits = out.logits[:, -1]
    if bool(invalid.any()):
        raise ValueError(draws.NO_FINITE_LOGIT)
    if on_step is not None:
        on_step(None)
    generated = generated.cpu()  # the tokens' one copy to the host
    ended = torch.isin(generated, torch.tensor(eos_ids))
    # an answer's tokens run up to its first EOS, which is dropped (as `_decode` returns them)
    lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), max_new_tokens).tolist()
    return [ids[:length] for ids, length in zip(generated.tolist(), lengths)]


def _check_common(questions, max_new_tokens: int) -> list[str]:
    if isinstance(questions, str):
        raise ValueError("questions must be a list of strings, got a single string; wrap it in a list")
    questions = list(questions)
    bad = [q for q in questions if not isinstance(q, str)]
    if bad:
        raise ValueError(f"questions must be strings, got {type(bad[0]).__name__}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return questions


GREEDY = -1  # the sample index of a greedy row


def planned_rows(model, tokenizer, questions: list[str], rows: list[tuple[int, int]], max_new_tokens: int,
                 budget: int | None = None) -> int:
    """The batch (rows decoded together) for sampling `rows` of `questions` with `model`: the largest
    whose peak memory (`memory.sampling_plan`: weights, the key/value cache of the longest prompt plus
    `max_new_tokens`, the draw) fits `budget` bytes (default `memory.gpu_budget`: a setting, or
    what the GPU has free beside the loaded weights). It changes speed and memory, not the answers."""
    shape = memory.shape_of(model)
    quantization = "4bit" if getattr(model, "is_loaded_in_4bit", False) else None
    dtype = getattr(model, "dtype", torch.float32)
    if budget is None:
        budget = memory.gpu_budget(model_device(model), loaded=shape.weight_bytes(dtype, quantization))
    asked = sorted({i for i, _ in rows})
    width = max(len(encode_prompt(tokenizer, questions[i])) for i in asked) + max_new_tokens
    return memory.sampling_rows(shape, positions=width, budget=budget, rows_per_prompt=len(rows) / len(asked),
                                dtype=dtype, quantization=quantization)


def _run(model, tokenizer, questions: list[str], rows: list[tuple[int, int]], *, max_new_tokens: int, seed: int,
         temperature: float, top_p: float, logits_processors, batch_size: int, progress: bool,
         desc: str, step_observer: StepObserver | None = None, loop: str = "auto") -> list[list[int]]:
    """Token ids of each row (question index i, sample index j; j = GREEDY: argmax decoding), in the
    order of `rows`, decoded in batches of up to `batch_size` consecutive rows, by `loop` (`LOOPS`)."""
    static = _static_loop(model, loop, step_observer)
    reuse_freed_memory()
    prompts = {}
    if batch_size is None:  # a GPU: the largest batch whose memory plan fits what is free
        batch_size = planned_rows(model, tokenizer, questions, rows, max_new_tokens)
    eos_ids = _eos_ids(model, tokenizer)
    result: list[list[int]] = [[] for _ in rows]
    bar = tqdm(total=len(rows), desc=desc, unit="answer", disable=not progress, leave=False)

    def on_step(done):
        if done:
            bar.update(done)

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        distinct = sorted({i for i, _ in chunk})
        for i in distinct:
            if i not in prompts:
                prompts[i] = encode_prompt(tokenizer, questions[i])
        local = {i: k for k, i in enumerate(distinct)}
        keys = draws.row_keys(seed, [questions[i] for i, _ in chunk], [j for _, j in chunk])
        greedy_rows = np.array([j == GREEDY for _, j in chunk])
        observer = None
        if step_observer is not None:
            chunk_q, chunk_j = np.array([i for i, _ in chunk]), np.array([j for _, j in chunk])

            def observer(local_rows, step, logits, rows, tokens, chunk_q=chunk_q, chunk_j=chunk_j):
                step_observer(chunk_q[local_rows], chunk_j[local_rows], step, logits, rows, tokens)
        before = bar.n
        common = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      logits_processors=logits_processors, eos_ids=eos_ids, on_step=on_step)
        with decoding_attention(model), lean_lora(model):
            if static:
                ids = _decode_static(model, tokenizer, [prompts[i] for i in distinct], [local[i] for i, _ in chunk],
                                     keys, greedy_rows, **common)
            else:
                ids = _decode(model, tokenizer, [prompts[i] for i in distinct], [local[i] for i, _ in chunk], keys,
                              greedy_rows, observer=observer, **common)
        bar.update(before + len(chunk) - bar.n)  # rows cut at max_new_tokens count as done too
        result[start:start + len(chunk)] = ids
    bar.close()
    return result


def _static_loop(model, loop: str, step_observer) -> bool:
    """Whether `_run` decodes with `_decode_static`: `loop` "static", or "auto" on a GPU (any device but
    the CPU) without a step observer (which sees the answers still generating at every step)."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "static" and step_observer is not None:
        raise ValueError("the static loop does not call a step observer (it sees the live answers at every step): "
                         "use loop='prefix'")
    return loop == "static" or (loop == "auto" and step_observer is None and model_device(model).type != "cpu")


def _check_sampling(num_samples, temperature, top_p, seed) -> tuple[int, float, float, int]:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples (answers per question) must be an integer >= 1, got {num_samples!r}")
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise ValueError(f"temperature and top_p must be numbers, got {temperature!r} and {top_p!r}") from None
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1 keeps the whole vocabulary), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(num_samples), temperature, top_p, int(seed)


def _sample(model, tokenizer, questions, *, num_samples, temperature, top_p, max_new_tokens, seed, logits_processors,
            batch_size, progress, with_greedy: bool, step_observer: StepObserver | None = None, loop: str = "auto"):
    """Checked arguments -> (greedy ids per question or None, sampled ids per question)."""
    questions = _check_common(questions, max_new_tokens)
    num_samples, temperature, top_p, seed = _check_sampling(num_samples, temperature, top_p, seed)
    if _is_engine(model):  # another engine (vllm_backend.VLLMSampler) samples for us
        out = model.sample_token_ids(questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
                                     max_new_tokens=int(max_new_tokens), seed=seed, logits_processors=logits_processors,
                                     step_observer=step_observer, with_greedy=with_greedy, progress=progress)
        return out if with_greedy else (None, out)
    batch_size = _check_batch_size(batch_size, model)
    first = [GREEDY] if with_greedy else []
    rows = [(i, j) for i in range(len(questions)) for j in first + list(range(num_samples))]
    ids = _run(model, tokenizer, questions, rows, max_new_tokens=int(max_new_tokens), seed=seed,
               temperature=temperature, top_p=top_p, logits_processors=list(logits_processors or []),
               batch_size=batch_size, progress=progress, desc="sampling",
               step_observer=step_observer, loop=loop) if questions else []
    width = num_samples + len(first)
    per_question = [ids[k * width:(k + 1) * width] for k in range(len(questions))]
    greedy = [rows_[0] for rows_ in per_question] if with_greedy else None
    return greedy, [rows_[len(first):] for rows_ in per_question]


def _is_engine(model) -> bool:
    """An external sampling engine (e.g. `vllm_backend.VLLMSampler`) rather than a torch model."""
    return not isinstance(model, torch.nn.Module) and hasattr(model, "sample_token_ids")


def answer_texts(tokenizer, ids: list[list[int]]) -> list[str]:
    """Generated token ids -> answer texts (special tokens skipped, stripped), as every decoder here returns them."""
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@renamed_arguments(n="num_samples")
def sample_token_ids(model, tokenizer, questions: Sequence[str], *, num_samples: int, temperature: float = 1.0,
                     top_p: float = 1.0, max_new_tokens: int, seed: int = 0,
                     logits_processors: Sequence[LogitsProcessor] | None = None,
                     batch_size: int | None = None, progress: bool = True,
                     step_observer: StepObserver | None = None, loop: str = "auto") -> list[list[list[int]]]:
    """Like `sample_answers`, but the generated token ids (EOS not included): `result[i][j]` is
    the list of tokens of answer j to question i. An empty list means EOS came first. `loop`: how
    batches decode (`LOOPS`): "prefix", rows shared by answers with the same prefix (a CPU's
    default); "static", a row per answer and no wait for the device between steps (a GPU's default,
    `_decode_static`). The answers are the same (the tests)."""
    return _sample(model, tokenizer, questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, seed=seed, logits_processors=logits_processors,
                   batch_size=batch_size, progress=progress, with_greedy=False, step_observer=step_observer,
                   loop=loop)[1]


def sample_rows(model, tokenizer, questions: Sequence[str], rows: Sequence[tuple[int, int]], *,
                temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int, seed: int = 0,
                logits_processors: Sequence[LogitsProcessor] | None = None, batch_size: int | None = None,
                progress: bool = True, step_observer: StepObserver | None = None,
                loop: str = "auto") -> list[list[int]]:
    """Token ids of chosen answers only: `rows` lists (question index i, sample index j), j >= 0 a
    sample or `GREEDY` (-1) the greedy answer. Answer j to question i is the one `sample_token_ids`
    draws with the same seed (its random stream depends on (seed, question text, j) only), so a few
    answers can be redrawn, e.g. under a logits processor, without decoding the others. `loop`: as in
    `sample_token_ids`."""
    questions = _check_common(questions, max_new_tokens)
    _, temperature, top_p, seed = _check_sampling(1, temperature, top_p, seed)
    batch_size = _check_batch_size(batch_size, model)
    rows = [(int(i), int(j)) for i, j in rows]
    bad = [(i, j) for i, j in rows if not (0 <= i < len(questions) and j >= GREEDY)]
    if bad:
        raise ValueError(f"rows must be (question index in [0, {len(questions)}), sample index >= {GREEDY}), "
                         f"got {bad[0]}")
    if not rows:
        return []
    return _run(model, tokenizer, questions, rows, max_new_tokens=int(max_new_tokens), seed=seed,
                temperature=temperature, top_p=top_p, logits_processors=list(logits_processors or []),
                batch_size=batch_size, progress=progress, desc="sampling", step_observer=step_observer, loop=loop)


@renamed_arguments(n="num_samples")
def sample_answers(model, tokenizer, questions: Sequence[str], *, num_samples: int, temperature: float = 1.0,
                   top_p: float = 1.0, max_new_tokens: int, seed: int = 0,
                   logits_processors: Sequence[LogitsProcessor] | None = None,
                   batch_size: int | None = None, progress: bool = True) -> list[list[str]]:
    """`num_samples` sampled answers to each raw question (formatted with `models.format_prompt`), in order:
    `result[i][j]` is answer j to question i, the decoded new text only (special tokens skipped,
    stripped). SPEC §5, [P1] §4.

    temperature >= 0 (0: greedy), top_p in (0, 1] (1: no truncation); seed: answer j to a
    question is a pure function of (model, seed, question text, j). logits_processors: callables
    `(input_ids, scores) -> scores` applied to the raw float32 logits, before temperature and
    top-p (see the module docstring). batch_size: answers decoded together (default 512 on a
    CPU; on a GPU the most whose memory plan fits, `planned_rows`, up to 2048); it changes speed
    and memory, not the answers (see the bfloat16 caveat in
    the module docstring). Shows a progress bar unless progress=False.
    """
    ids = sample_token_ids(model, tokenizer, questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, seed=seed, logits_processors=logits_processors,
                           batch_size=batch_size, progress=progress)
    return [answer_texts(tokenizer, rows) for rows in ids]


@renamed_arguments(n="num_samples")
def greedy_and_sampled_answers(model, tokenizer, questions: Sequence[str], *, num_samples: int,
                               temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int, seed: int = 0,
                               logits_processors: Sequence[LogitsProcessor] | None = None,
                               batch_size: int | None = None, progress: bool = True,
                               step_observer: StepObserver | None = None) -> tuple[list[str], list[list[str]]]:
    """`(greedy_answers(...), sample_answers(...))`. An engine (vLLM), and our sampler on a float32
    model, decode the greedy row of each question in the same batches as its n samples, which saves
    a decoding loop (the answers are those of the two calls). On a bfloat16 or float16 model our
    sampler makes the two calls, since its greedy answers run in float32 (`greedy_answers`) and its
    samples in the model's dtype. The logits processors and the step observer apply to the samples
    and, where they are decoded together, to the greedy rows too (sample index `GREEDY`)."""
    if _is_engine(model) or not full_precision_changes(model):
        greedy, sampled = _sample(model, tokenizer, questions, num_samples=num_samples, temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                  logits_processors=logits_processors, batch_size=batch_size, progress=progress,
                                  with_greedy=True, step_observer=step_observer)
        return answer_texts(tokenizer, greedy), [answer_texts(tokenizer, rows) for rows in sampled]
    greedy = greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                            batch_size=_check_batch_size(batch_size, model), progress=progress)
    _, sampled = _sample(model, tokenizer, questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed, logits_processors=logits_processors,
                         batch_size=batch_size, progress=progress, with_greedy=False, step_observer=step_observer)
    return greedy, [answer_texts(tokenizer, rows) for rows in sampled]


def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = 32, progress: bool = True) -> list[str]:
    """Greedy (argmax) answers to raw questions, formatted with `format_prompt`; returns the decoded
    new text only, without special tokens, stripped. `batch_size`: questions decoded together.
    Same batched, cached decoding as `sample_answers` (used by every greedy evaluation), in float32
    (`models.full_precision`): in bfloat16 an argmax near a tie depends on which other questions
    share the batch, so two notebooks asking different sets of questions would get different greedy
    answers from one model; in float32 the answer is the model's and the question's alone."""
    questions = _check_common(questions, max_new_tokens)
    if _is_engine(model):
        greedy, _ = model.sample_token_ids(questions, num_samples=0, max_new_tokens=int(max_new_tokens),
                                           with_greedy=True, progress=progress)
        return answer_texts(tokenizer, greedy)
    batch_size = _check_batch_size(batch_size, model)
    if not questions:
        return []
    with full_precision(model):
        ids = _run(model, tokenizer, questions, [(i, GREEDY) for i in range(len(questions))],
                   max_new_tokens=int(max_new_tokens), seed=0, temperature=0.0, top_p=1.0, logits_processors=[],
                   batch_size=batch_size, progress=progress and (batch_size is None or len(questions) > batch_size),
                   desc="greedy")
    return answer_texts(tokenizer, ids)


def _check_batch_size(batch_size, model) -> int | None:
    """A checked `batch_size`; None (the default) is `DEFAULT_ROWS` on a CPU and stays None on a GPU,
    where `_run` plans it from memory (`planned_rows`)."""
    if batch_size is None:
        return DEFAULT_ROWS if model_device(model).type == "cpu" else None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)
