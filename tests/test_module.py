"""TrainingModule pieces: schedule, decay groups, bits per byte, hardware arithmetic."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from efficia.config import compose_run
from efficia.errors import ConfigError
from efficia.training.hardware import memory_fraction, plan_accumulation, search_micro_batch
from efficia.training.module import BitsPerByte, TrainingModule, warmup_cosine
from tests.conftest import tiny_model_cfg


def test_warmup_then_cosine_to_the_floor() -> None:
    lr = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr[110] == pytest.approx(0.1) and lr[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))


def test_bits_per_byte_weighs_by_target_bytes() -> None:
    metric = BitsPerByte()
    metric.update(torch.tensor([math.log(2), math.log(2)]), torch.tensor([1.0, 3.0]))
    metric.update(torch.tensor([2 * math.log(2)]), torch.tensor([4.0]))
    assert metric.compute().item() == pytest.approx(4 / 8)  # 4 bits over 8 bytes


def tiny_module(optimizer: dict) -> TrainingModule:
    cfg = {"model": tiny_model_cfg("gpt", "model.n_layer=1", "model.bias=true", "model.pos_emb=learned"),
           "optimizer": optimizer, "scheduler": {"warmup_steps": 2, "min_lr_ratio": 0.1}}
    return TrainingModule(cfg, {"kind": "char", "chars": "abcdef"})


@pytest.mark.parametrize("target", ["torch.optim.AdamW", "torch.optim.Adafactor"])
def test_decay_only_matrices(target: str) -> None:
    module = tiny_module({"_target_": target, "lr": 1e-3, "weight_decay": 0.1})
    module.trainer = type("T", (), {"estimated_stepping_batches": 100})()
    opt = module.configure_optimizers()["optimizer"]
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == module.net.num_params()  # the tied embedding counted once


@pytest.mark.parametrize(("batch", "fits", "expected"), [
    (8, 8, (8, 1)), (8, 100, (8, 1)), (8, 3, (2, 4)), (12, 5, (4, 3)), (7, 3, (1, 7)), (64, 16, (16, 4)),
])
def test_accumulation_keeps_the_effective_batch(batch: int, fits: int, expected: tuple[int, int]) -> None:
    micro, accumulate = plan_accumulation(batch, fits)
    assert (micro, accumulate) == expected and micro * accumulate == batch and micro <= fits


def test_accumulation_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="positive"):
        plan_accumulation(0, 4)


def test_memory_fraction_caps_a_bigger_card_only() -> None:
    gib = 2**30
    assert memory_fraction(12 * gib, 80 * gib) == pytest.approx(0.15)
    assert memory_fraction(12 * gib, 12 * gib) == 1.0
    assert memory_fraction(24 * gib, 12 * gib) == 1.0


def test_micro_batch_search_takes_the_largest_that_fits_then_plans_accumulation() -> None:
    tried = []

    def fits_under_10(micro: int) -> bool:  # a card on which at most 10 sequences fit
        tried.append(micro)
        return micro <= 10

    assert search_micro_batch(64, fits_under_10) == 8 and tried == [64, 32, 16, 8]
    assert plan_accumulation(64, 8) == (8, 8)
    assert search_micro_batch(12, fits_under_10) == 6 and plan_accumulation(12, 6) == (6, 2)
    assert search_micro_batch(4, lambda micro: False) is None


def test_optimizer_state_is_measured_for_the_configured_optimizer() -> None:
    """The GPU micro-batch planner counts AdamW's two moments, but Adafactor's factored rows + columns."""
    from efficia.training.hardware import optimizer_state_bytes

    params = [torch.nn.Parameter(torch.zeros(300, 200)), torch.nn.Parameter(torch.zeros(300, 200)),
              torch.nn.Parameter(torch.zeros(200))]
    adamw = optimizer_state_bytes({"_target_": "torch.optim.AdamW", "lr": 1e-3}, params)
    adafactor = optimizer_state_bytes({"_target_": "torch.optim.Adafactor", "lr": 1e-3}, params)
    assert adamw == 2 * (2 * 300 * 200 + 200) * 4
    assert adafactor == (2 * (300 + 200) + 200) * 4
    muon = optimizer_state_bytes(muon_cfg(), [{"params": params[:1], "muon": True}, {"params": params[1:]}])
    assert muon == (300 * 200 + 2 * (300 * 200 + 200)) * 4  # one momentum for the hidden matrix, AdamW's two moments


def muon_cfg() -> dict:
    cfg = compose_run(["optimizer=muon", "optimizer.fused=false"], tempfile.gettempdir())
    return OmegaConf.to_container(cfg.optimizer, resolve=True)


def test_the_gpu_budget_measures_the_optimizer_state_on_the_runs_own_groups() -> None:
    """Under optimizer=muon the hidden matrices keep one buffer, not AdamW's two: the budget asks the module."""
    from efficia.training.hardware import optimizer_state_bytes

    module = tiny_module(muon_cfg())
    hidden = {id(p) for g in module.parameter_groups() if g.get("muon") for p in g["params"]}
    every = [p for p in module.parameters() if p.requires_grad]
    expected = 4 * sum(p.numel() * (1 if id(p) in hidden else 2) for p in every)
    assert hidden and optimizer_state_bytes(module.cfg["optimizer"], module.parameter_groups()) == expected
