"""The sampling benchmark's profile (benchmarks/sampling.py --profile), on the tiny model: it splits
a run of our sampler into its parts and leaves the sampler and the model as they were."""

import argparse
import importlib.util

import pytest
import torch

from probunlearn import draws
from conftest import ROOT
from tiny_lm import tiny_model, tiny_tokenizer


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sampling_benchmark", ROOT / "benchmarks" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_splits_a_run_into_its_parts_and_restores_the_sampler():
    benchmark = load_benchmark()
    model, tokenizer = tiny_model(), tiny_tokenizer()
    draw, forward = draws.draw, model.forward
    args = argparse.Namespace(samples=16, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=None,
                              loop="auto")
    seconds, shares = benchmark.profile_ours(model, tokenizer, ["who", "what is it"], args)
    assert seconds > 0
    assert list(shares) == list(benchmark.PARTS)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(share >= 0 for share in shares.values())
    # every part of decoding shows up: the model's products and attention, the draws, the loop around them
    assert all(share > 0 for share in shares.values()), shares
    assert draws.draw is draw and "forward" not in vars(model) and model.forward == forward


def test_the_adapter_workload_puts_a_nonzero_lora_update_on_the_top_blocks_the_same_in_every_run():
    from peft.tuners.lora.layer import Linear as LoraLinear

    benchmark = load_benchmark()
    first, second = (benchmark.with_random_adapter(tiny_model(), top_layers=1) for _ in range(2))
    layers = [name for name, m in first.named_modules() if type(m) is LoraLinear]
    assert layers and all(".layers.1." in name for name in layers)  # the top block only
    lora = {n: p for n, p in first.named_parameters() if "lora_" in n}
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in lora.items())  # the update changes the model
    again = dict(second.named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in lora.items())  # seeded: one adapter for every run
