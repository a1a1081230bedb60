"""optimizer=muon: each model's parameters placed on purpose, the combined optimizer equal to torch's two by hand,
exact resume and gradient accumulation through train()."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from efficia.errors import ConfigError
from efficia.models.registry import MODELS
from efficia.training.module import TrainingModule, warmup_cosine
from efficia.training.muon import split_for_muon
from efficia.training.run import train
from tests.conftest import EXTERNAL_TABLE, require_data
from tests.test_reliability import NaNLossAt, assert_same_weights, weights

GATED_FFN = ["blocks.*.ffn.down.weight", "blocks.*.ffn.gate.weight", "blocks.*.ffn.up.weight"]
LATENT = ["blocks.*.mixer.heads.uk.weight", "blocks.*.mixer.heads.uv.weight", "blocks.*.mixer.kv.down.weight"]
NORMS = ["blocks.*.norm1.weight", "blocks.*.norm2.weight", "norm.weight"]

# (model, overrides) -> (names Muon trains, names AdamW trains), block indices as `*`, at scale=tiny. A new
# parameter changes these lists: place it on the model class (muon_matrices / adamw_matrices) and here, knowingly.
GROUPS = {
    ("gpt", "model.bias=true"): (
        ["blocks.*.ffn.fc.weight", "blocks.*.ffn.proj.weight", "blocks.*.mixer.proj.weight",
         "blocks.*.mixer.qkv.weight"],
        ["blocks.*.ffn.fc.bias", "blocks.*.ffn.proj.bias", "blocks.*.mixer.proj.bias", "blocks.*.mixer.qkv.bias",
         "blocks.*.norm1.bias", "blocks.*.norm1.weight", "blocks.*.norm2.bias", "blocks.*.norm2.weight",
         "norm.bias", "norm.weight", "tok_emb.weight"]),
    ("yinggem",): (
        [*GATED_FFN, "blocks.*.mixer.proj.weight", "blocks.*.mixer.qkv.weight"],
        ["blocks.*.mixer.proj.bias", "blocks.*.mixer.qkv.bias", *NORMS, "lm_head.weight", "tok_emb.weight"]),
    ("efficia",): (
        [*GATED_FFN, "blocks.*.mixer.local.qkv.weight", "blocks.*.mixer.memory.kv.weight",
         "blocks.*.mixer.memory.qg.weight", "blocks.*.mixer.proj.weight",
         "blocks.*.mixer.recurrence.gru.weight_hh_l0", "blocks.*.mixer.recurrence.gru.weight_ih_l0",
         "blocks.*.mixer.recurrence.out.weight", "blocks.*.mixer.summary.compress.weight"],
        ["blocks.*.mixer.fuse.weight", "blocks.*.mixer.local.conv", "blocks.*.mixer.memory.persistent",
         "blocks.*.mixer.recurrence.gru.bias_hh_l0", "blocks.*.mixer.recurrence.gru.bias_ih_l0",
         "blocks.*.mixer.recurrence.h0", "blocks.*.mixer.summary.pool", *NORMS, "tok_emb.weight"]),
    ("optimus",): (
        [*GATED_FFN, *LATENT, "blocks.*.mixer.proj.weight", "blocks.*.mixer.query.down.weight",
         "blocks.*.mixer.query.up.weight"],
        ["blocks.*.mixer.kv.norm.weight", "blocks.*.mixer.query.norm.weight", *NORMS, "tok_emb.weight"]),
    ("optimus", "model.attention=gqa"): (
        [*GATED_FFN, "blocks.*.mixer.proj.weight", "blocks.*.mixer.qkv.weight"],
        [*NORMS, "tok_emb.weight"]),
    ("efficientlm", f"model.external.source={EXTERNAL_TABLE}"): (
        ["adapter.skip.weight", "adapter.up.weight", "adapter.w1.weight", "adapter.w2.weight", *GATED_FFN, *LATENT,
         "blocks.*.mixer.proj.weight", "blocks.*.mixer.query.up.weight"],
        ["blocks.*.mixer.kv.norm.weight", "blocks.*.mixer.merge.fc_c.bias", "blocks.*.mixer.merge.fc_c.weight",
         "blocks.*.mixer.merge.fc_p.bias", "blocks.*.mixer.merge.fc_p.weight", *NORMS, "pos_emb.weight",
         "tok_emb.weight"]),
    ("lumenspark",): (
        ["blocks.*.ffn.fc.down.weight", "blocks.*.ffn.fc.up.weight", "blocks.*.ffn.proj.down.weight",
         "blocks.*.ffn.proj.up.weight", "blocks.*.mixer.kv.weight", "blocks.*.mixer.proj.weight",
         "blocks.*.mixer.q.down.weight", "blocks.*.mixer.q.up.weight"],
        ["blocks.*.mixer.e", "blocks.*.mixer.f", *NORMS, "lm_head.weight", "pos_emb.weight", "tok_emb.weight"]),
}


def any_block(names: list[str]) -> list[str]:
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def test_every_model_is_listed() -> None:
    assert {key[0] for key in GROUPS} == set(MODELS)


@pytest.mark.parametrize("model", GROUPS, ids=["gpt-bias", "yinggem", "efficia", "optimus", "optimus-gqa",
                                               "efficientlm-adapter", "lumenspark"])
def test_each_models_parameters_are_placed_on_purpose(tiny_model, model: tuple[str, ...]) -> None:
    net = tiny_model(*model)
    hidden, other = split_for_muon(net)
    assert (any_block(hidden), any_block(other)) == tuple(sorted(names) for names in GROUPS[model])
    assert len(hidden) + len(other) == len({id(p) for p in net.parameters()})  # every trainable tensor, once


def test_a_matrix_declared_nowhere_is_refused(tiny_model) -> None:
    net = tiny_model("gpt")
    net.blocks[1].mixer.extra = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ConfigError, match=r"blocks\.1\.mixer\.extra \(4, 4\) of model GPT is in neither "
                                          r"muon_matrices nor adamw_matrices; declare it"):
        split_for_muon(net)


def test_one_step_equals_torch_muon_and_adamw_by_hand(make_cfg) -> None:
    """Three steps of the combined optimizer under the run's schedule equal torch.optim.Muon on the hidden
    matrices + torch.optim.AdamW on the rest (decayed matrices, undecayed vectors), each at its own lr x factor."""
    cfg = OmegaConf.to_container(make_cfg("optimizer=muon", "scale=tiny", "model.bias=true", "model.pos_emb=learned",
                                          "scheduler.warmup_steps=1", "optimizer.muon.lr=0.02",
                                          "optimizer.muon.weight_decay=0.05"), resolve=True)
    torch.manual_seed(0)
    module = TrainingModule(cfg, {"kind": "char", "chars": "abcdefgh"})
    reference = copy.deepcopy(module.net)
    initial = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    total = 4
    optimizer, schedule = module.optimizer_and_schedule(total)

    adamw, muon, sched = cfg["optimizer"], cfg["optimizer"]["muon"], cfg["scheduler"]
    named = dict(reference.named_parameters())
    hidden = split_for_muon(reference)[0]
    rest = [p for name, p in named.items() if name not in hidden]
    by_hand = [
        torch.optim.Muon([named[name] for name in hidden], lr=muon["lr"], weight_decay=muon["weight_decay"],
                         momentum=muon["momentum"], nesterov=muon["nesterov"], ns_steps=muon["ns_steps"],
                         adjust_lr_fn=muon["adjust_lr_fn"]),
        torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": adamw["weight_decay"]},
                           {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                          lr=adamw["lr"], betas=tuple(adamw["betas"]), fused=adamw["fused"]),
    ]
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        factor = warmup_cosine(step, sched["warmup_steps"], total, sched["min_lr_ratio"])
        for opt, base in zip(by_hand, (muon["lr"], adamw["lr"]), strict=True):
            for group in opt.param_groups:
                group["lr"] = base * factor
        idx = torch.randint(8, (2, 9), generator=generator)
        for net in (module.net, reference):
            F.cross_entropy(net(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        for opt in (optimizer, *by_hand):
            opt.step()
            opt.zero_grad(set_to_none=True)
        schedule.step()
    for name, p in module.net.named_parameters():
        assert torch.equal(p, named[name]), name
        assert not torch.equal(p, initial[name]), f"{name} never moved"


MUON_RUN = ["debug=limit", "logger=csv", "optimizer=muon", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", "callbacks.progress_bar=null"]


def test_muon_resumes_exactly(make_cfg) -> None:
    """8 steps straight equal 4 steps, then resumed from that checkpoint to 8: both optimizers' states, their
    learning rates and the schedule come back bit for bit. (Warmup covers every step, so the schedule does not
    depend on max_steps.)"""
    require_data()
    common = [*MUON_RUN, "scheduler.warmup_steps=100"]
    straight = train(make_cfg(*common, "trainer.max_steps=8"))
    half = train(make_cfg(*common, "trainer.max_steps=4"))
    state = torch.load(half["last_ckpt"], weights_only=True)["optimizer_states"][0]
    assert set(state) == {"muon", "adamw"} and all("momentum_buffer" in s for s in state["muon"]["state"].values())
    resumed = train(make_cfg(*common, "trainer.max_steps=8", f"ckpt_path={half['last_ckpt']}"))
    assert_same_weights(weights(resumed["last_ckpt"]), weights(straight["last_ckpt"]))


def test_muon_accumulation_equals_the_large_batch(make_cfg) -> None:
    """Two micro-batches of 2 per step train as one batch of 4 (float rounding apart)."""
    require_data()
    large = train(make_cfg(*MUON_RUN, "trainer.max_steps=3", "data.batch_size=4"))
    accumulated = train(make_cfg(*MUON_RUN, "trainer.max_steps=3", "data.batch_size=2",
                                 "trainer.accumulate_grad_batches=2"))
    a, b = (weights(run["last_ckpt"]) for run in (large, accumulated))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    momentum = torch.load(large["last_ckpt"], weights_only=True)["optimizer_states"][0]["muon"]["state"]
    assert len(momentum) == 8 and all(s["momentum_buffer"].abs().sum() > 0 for s in momentum.values())  # it trained


def test_muon_under_bf16_autocast_clipping_and_the_nan_guard(make_cfg, capsys) -> None:
    """bf16 autocast, gradient clipping (every step at 1e-3, so it always acts) and accumulation, with one NaN
    batch skipped by nonfinite_loss=skip: every step but that one trains, and the weights stay finite."""
    require_data()
    nan_once = [f"+callbacks.nan._target_={NaNLossAt.__module__}.NaNLossAt", "+callbacks.nan.step=2"]
    result = train(make_cfg(*MUON_RUN, "trainer.max_steps=4", "trainer.precision=bf16-mixed",
                            "trainer.gradient_clip_val=1e-3", "trainer.accumulate_grad_batches=2",
                            "nonfinite_loss=skip", *nan_once))
    assert result["global_step"] == 4
    assert "step 3: train/loss is nan; skipping this batch" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in weights(result["last_ckpt"]).values())
