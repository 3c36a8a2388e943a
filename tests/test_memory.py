"""Memory plans (probunlearn.memory), from configs alone: exact where they count what our code
allocates (parameters, LoRA parameters, the sampler's key/value cache), and what they say of the
paper profile's models (phi-1.5, Llama-3.2-1B, built on the meta device) on a 24 GB GPU and a T4's 15."""

import pytest
import torch

from probunlearn import memory, sampling
from probunlearn.models import add_lora
from probunlearn.utils import load_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shape_counts_the_parameters_and_lora_parameters_of_the_model(tiny):
    model = tiny["model"]
    shape = memory.Shape.of(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    adapted = add_lora(__import__("copy").deepcopy(model), r=4, lora_alpha=8)
    lora = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
    assert shape.lora_params_per_rank * 4 == lora
    assert shape.weight_bytes(torch.float32) == 4 * shape.params


def test_the_sampling_plan_counts_the_cache_the_sampler_allocates(tiny, monkeypatch):
    """The key/value part of `sampling_plan` equals the bytes of the buffers our sampler's cache
    allocates for a batch: a row per answer and per distinct prompt, prompt + answer positions."""
    from probunlearn.models import encode_prompt

    caches = []
    original = sampling.kv_cache
    monkeypatch.setattr(sampling, "kv_cache", lambda *a, **k: caches.append(original(*a, **k)) or caches[-1])
    # the plan is a GPU's, whose decoding attention does not share prompts (kv_cache.SharedPrompt)
    monkeypatch.setattr(sampling, "SHARED_PROMPT_ROWS", 10**9)
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    questions, n, new = ["Who wrote Salt?", "What did Ana write?"], 6, 9
    sampling.sample_token_ids(model, tokenizer, questions, num_samples=n, max_new_tokens=new, batch_size=12,
                              progress=False)
    assert len(caches) == 1  # one batch of 2 x 6 answers
    allocated = sum(layer._keys.nbytes + layer._values.nbytes for layer in caches[0].layers)
    width = max(len(encode_prompt(tokenizer, q)) for q in questions)
    plan = memory.sampling_plan(memory.Shape.of(model.config), rows=12, positions=width + new, rows_per_prompt=n,
                                dtype=torch.float32)
    assert plan.parts["kv cache"] == allocated


def test_the_planned_batch_is_the_largest_that_fits():
    shape = memory.Shape.of(memory.paper_configs()["phi-1.5"], "phi-1.5")
    kwargs = dict(positions=192, rows_per_prompt=129, quantization="4bit")
    for budget_gb in (24, 15, 8):
        rows = memory.sampling_rows(shape, budget=budget_gb * memory.GB, **kwargs)
        assert memory.sampling_plan(shape, rows=rows, **kwargs).fits(budget_gb)
        assert not memory.sampling_plan(shape, rows=rows + 1, **kwargs).fits(budget_gb)
    with pytest.raises(MemoryError, match="one row"):
        memory.sampling_rows(shape, budget=memory.GB, **kwargs)  # 1 GB: not even the weights and overhead


def test_paper_models_sampling_fits_a_consumer_gpu_and_a_t4_where_the_old_default_did_not():
    """[P1]'s n = 128 answers of 128 new tokens: the old fixed batch of 2048 rows planned far past a
    24 GB card for phi-1.5 (full multi-head keys and values); the planned batch fits 24 and 15 GB."""
    settings = load_profile("paper")
    positions = 64 + settings["SAMPLE_MAX_NEW_TOKENS"]
    shapes = {name: memory.Shape.of(config, name) for name, config in memory.paper_configs().items()}
    assert shapes["phi-1.5"].params == pytest.approx(1.42e9, rel=0.01)  # the published sizes
    assert shapes["Llama-3.2-1B"].params == pytest.approx(1.24e9, rel=0.01)
    old = memory.sampling_plan(shapes["phi-1.5"], rows=2048, positions=positions, rows_per_prompt=129,
                               quantization="4bit")
    assert old.total > 3 * 24 * memory.GB
    for shape in shapes.values():
        for budget_gb, dtype in ((24, torch.bfloat16), (15, torch.float16)):
            plans = memory.profile_plans(settings, shape, budget_gb=budget_gb, dtype=dtype)
            sampling_plan = next(p for p in plans if p.what.startswith("05"))
            assert sampling_plan.fits(budget_gb) and "rows planned" in sampling_plan.what


def test_gradient_checkpointing_is_what_lets_a_qlora_step_of_phi_fit_24_gb():
    """The plan's reading of notebook 03's largest QLoRA step (GA + mismatch at batch 32, 160 rows of
    256 tokens): far past 24 GB with every block's activations kept, under it with checkpointing."""
    settings = load_profile("paper")
    shape = memory.Shape.of(memory.paper_configs()["phi-1.5"], "phi-1.5")
    plain, checkpointed = (memory.profile_plans(settings, shape, gradient_checkpointing=c)[0] for c in (False, True))
    assert plain.what.startswith("03") and "ga_mismatch" in plain.what
    assert not plain.fits(24) and checkpointed.fits(24)
    assert plain.parts["activations"] > 10 * checkpointed.parts["activations"]


def test_the_gpu_budget_follows_the_setting(monkeypatch):
    monkeypatch.setenv("PROBUNLEARN_GPU_MEMORY_GB", "15")
    assert memory.gpu_budget() == 15 * memory.GB


def test_the_sampler_plans_its_gpu_batch_from_the_budget(tiny, monkeypatch):
    """What `_run` does on a GPU when no batch size is given: the largest batch that fits (here
    planned for the tiny model on this CPU, with budgets in bytes)."""
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    questions = ["Who wrote Salt?", "What did Ana write?"]
    rows = [(i, j) for i in range(2) for j in range(64)]
    shape = memory.Shape.of(model.config)
    one = memory.sampling_plan(shape, rows=1, positions=40, dtype=torch.float32).total
    small = sampling.planned_rows(model, tokenizer, questions, rows, 24, budget=one + 2_000_000)
    large = sampling.planned_rows(model, tokenizer, questions, rows, 24, budget=one + 20_000_000)
    assert 1 <= small < large <= memory.MAX_ROWS
    monkeypatch.setenv("PROBUNLEARN_GPU_MEMORY_GB", str((one + 2_000_000) / memory.GB))
    assert sampling.planned_rows(model, tokenizer, questions, rows, 24) == small


@pytest.mark.parametrize("model", ["phi-1.5", "Llama-3.2-1B"])
def test_the_paper_profile_fits_the_gpus_its_comments_name(model):
    """What profiles/paper.yaml says of GPU memory, as planned: notebook 03's largest unlearning step,
    batch 32 in parts of UNLEARN_MICRO_BATCH 8, fits 24 GB and a T4's 15 GB, which the whole batch at
    once does not; sampling and relearning fit both; notebook 04's full fine-tuning needs more than 24
    GB and fits 40, and with `DYNAMICS_TUNING: lora` (notebook 03's QLoRA adapter) fits 24 GB."""
    settings = load_profile("paper")
    assert settings["UNLEARN_BATCH_SIZE"] == 32 and settings["UNLEARN_MICRO_BATCH"] == 8
    shape = memory.Shape.of(memory.paper_configs()[model], model)

    def plans(budget_gb, dtype, micro=settings["UNLEARN_MICRO_BATCH"]):
        return memory.profile_plans({**settings, "UNLEARN_MICRO_BATCH": micro}, shape, budget_gb=budget_gb,
                                    dtype=dtype, gradient_checkpointing=True)

    for budget_gb, dtype in ((24, torch.bfloat16), (15, torch.float16)):
        step, full, sampling, relearning = plans(budget_gb, dtype)
        assert "in parts of 8" in step.what and step.fits(budget_gb)
        assert sampling.fits(budget_gb) and relearning.fits(budget_gb)
        assert not full.fits(24) and full.fits(40)
        lora = memory.profile_plans({**settings, "DYNAMICS_TUNING": "lora"}, shape, budget_gb=budget_gb, dtype=dtype,
                                    gradient_checkpointing=True)[1]
        assert lora.what.startswith("04 LoRA step") and lora.fits(24) and lora.total < full.total / 2
        assert not plans(budget_gb, dtype, micro=None)[0].fits(15)  # at once: past a T4
        assert plans(budget_gb, dtype, micro=None)[0].total > 2 * step.total
