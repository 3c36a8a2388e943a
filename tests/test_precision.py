"""Dtypes by hardware (probunlearn.hardware.precision) and training that cannot underflow in float16:
the choices a GPU of compute capability 7.5 (a T4), 8.0 and 9.0 gets, faked here, and a few float16
fine-tuning and unlearning steps of the tiny model run on this CPU through the code a T4 runs
(`hardware.loss_scaler`): the stand-in for a T4's numerics."""

import copy

import pytest
import torch

from probunlearn import backends, hardware, vllm_backend
from probunlearn.training import train_lora
from probunlearn.unlearning import adapter_state, unlearn
from tiny_unlearning import FORGET, RETAIN, forget_nll, fresh

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device whose compute capability the test sets (`gpu(7, 5)`). torch's own
    `is_bf16_supported` answers True on a T4 too (emulated bfloat16): the choice must not follow it."""
    monkeypatch.delenv("PROBUNLEARN_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor))

    return set_capability


@pytest.mark.parametrize("capability, weights, vllm", [((7, 5), torch.float16, "float16"),
                                                       ((8, 0), torch.bfloat16, "bfloat16"),
                                                       ((9, 0), torch.bfloat16, "bfloat16")])
def test_gpu_precision_follows_compute_capability(gpu, capability, weights, vllm):
    gpu(*capability)
    plan = hardware.precision("cuda")
    assert plan.weights == hardware.default_dtype("cuda") == weights
    assert plan.trained == torch.float32  # adapters, full fine-tuning weights, AdamW state
    assert plan.autocast == weights
    assert plan.loss_scaling is (weights == torch.float16)
    assert plan.vllm == vllm


def test_vllm_is_started_in_the_dtype_of_the_gpu(gpu, monkeypatch):
    started = {}
    monkeypatch.setattr(backends, "default_device", lambda: "cuda")
    monkeypatch.setattr(backends, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(vllm_backend, "shared_sampler", lambda path, tokenizer, **kwargs: started.update(kwargs))
    for capability, expected in (((7, 5), "float16"), ((8, 6), "bfloat16")):
        gpu(*capability)
        backends.load_sampler("some-model", sampler="vllm")
        assert started["dtype"] == expected  # vLLM refuses bfloat16 below 8.0


def test_cpu_precision_and_the_override(monkeypatch):
    monkeypatch.delenv("PROBUNLEARN_DTYPE", raising=False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.precision("cpu") == hardware.Precision(torch.float32, torch.float32, None, False, "float32")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert hardware.precision("cpu") == hardware.Precision(torch.bfloat16, torch.float32, torch.bfloat16, False,
                                                           "bfloat16")
    monkeypatch.setenv("PROBUNLEARN_DTYPE", "float16")  # a T4's numerics on this CPU
    assert hardware.precision("cpu").loss_scaling


class _RecordedAdamW(torch.optim.AdamW):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordedAdamW.made.append(self)


def _float16_target(tiny):
    """The tiny target with float16 weights and a fresh adapter, as a T4 loads it."""
    model, tokenizer = fresh({**tiny, "model": copy.deepcopy(tiny["model"]).half()})
    return model, tokenizer


def _adapter_change(model, before):
    return torch.cat([(v - before[k]).flatten() for k, v in adapter_state(model).items()])


def test_float16_fine_tuning_keeps_float32_adapters_and_learns(tiny, monkeypatch):
    """A T4 stand-in: fine-tuning steps with float16 weights run through the loss scaler, with
    float32 adapters and AdamW state, finite losses, and an update that lowers the loss."""
    from datasets import Dataset

    monkeypatch.setattr(torch.optim, "AdamW", _RecordedAdamW)
    _RecordedAdamW.made.clear()
    model, tokenizer = _float16_target(tiny)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trained == {torch.float32}
    before = float(forget_nll(model, tokenizer))
    log = train_lora(model, tokenizer, Dataset.from_list(FORGET), epochs=6, learning_rate=1e-2, batch_size=2,
                     progress=False)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in log)
    state = _RecordedAdamW.made[-1].state
    assert state and {s["exp_avg"].dtype for s in state.values()} == {torch.float32}
    lora_b = [v for k, v in adapter_state(model).items() if "lora_B" in k]
    assert all(torch.isfinite(v).all() for v in lora_b) and all(v.abs().sum() > 0 for v in lora_b)
    assert float(forget_nll(model, tokenizer)) < before - 0.1  # it learned the forget answers


def test_float16_unlearning_steps_are_scaled_finite_and_point_where_float32_does(tiny):
    """Gradient ascent with float16 weights (loss scaling on) moves the adapter in the direction the
    same steps take in float32, with finite losses; without scaling the float16 gradients of a tiny
    loss flush to zero, which is what the scaler prevents."""
    runs = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model, tokenizer = fresh({**tiny, "model": copy.deepcopy(tiny["model"]).to(dtype)})
        start = adapter_state(model)
        run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=4, learning_rate=1e-3, batch_size=2,
                      progress=False)
        assert all(torch.isfinite(torch.tensor(row["loss"])) for row in run.log)
        runs[dtype] = (run, _adapter_change(model, start), float(forget_nll(model, tokenizer)))
    assert "loss_scale" in runs[torch.float16][0].log[-1] and "loss_scale" not in runs[torch.float32][0].log[-1]
    change32, change16 = runs[torch.float32][1], runs[torch.float16][1]
    assert change16.norm() > 0.5 * change32.norm()  # not vanished (nor every step skipped)
    assert torch.nn.functional.cosine_similarity(change16, change32, dim=0) > 0.9
    assert runs[torch.float16][2] > float(forget_nll(*_float16_target(tiny)))  # ascent raised the forget NLL

    # what the scaler is for: a float16 gradient of 1e-8 is zero without it, kept with it
    weight = torch.nn.Parameter(torch.ones(4))
    hidden = (weight * 1.0).half()
    (hidden.float().sum() * 1e-8).backward()
    assert weight.grad.abs().max() == 0
    weight.grad = None
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((weight * 1.0).half().float().sum() * 1e-8).backward()
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scaler.unscale_(optimizer)
    assert weight.grad.abs().max() == pytest.approx(1e-8, rel=1e-2)


def test_full_fine_tuning_in_float16_products_is_scaled(tiny):
    """Full fine-tuning on a T4: float32 weights, float16 products (`compute_dtype`), loss scaling."""
    model = copy.deepcopy(tiny["model"]).float()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = unlearn(model, tiny["tokenizer"], FORGET, RETAIN, method="ga", steps=3, learning_rate=1e-4, batch_size=2,
                  compute_dtype=torch.float16, progress=False)
    assert all("loss_scale" in row and torch.isfinite(torch.tensor(row["loss"])) for row in run.log)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
