"""The output unit (efficia/models/output.py): the fused chunked linear + cross-entropy equals the plain
F.linear + F.cross_entropy in values and gradients: for every reduction, chunk sizes that do not divide the
token count, ignored targets (a whole ignored chunk included), tied and untied heads, every registered model
through the module's training and validation, and generate() asks for last-position logits only."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from efficia.checks import check_run_config
from efficia.config import compose_run
from efficia.errors import ConfigError
from efficia.inference.generate import generate
from efficia.models import MODELS
from efficia.models.output import linear_cross_entropy
from efficia.training.module import TrainingModule

N, C, V = 39, 16, 50  # 39 tokens: chunks of 5, 7, 16 and 38 all leave a ragged last chunk


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    hidden = torch.randn(N, C, requires_grad=True)
    weight = (torch.randn(V, C) * 0.5).requires_grad_()
    targets = torch.randint(V, (N,))
    targets[[1, 12, 38]] = -100  # scattered, and the last token
    targets[14:21] = -100  # chunk 2 of 7 (tokens 14..20) ignored entirely
    return hidden, weight, targets


def loss_and_grads(impl: str, reduction: str, chunk: int, hidden, weight, targets, upstream=None):
    loss = linear_cross_entropy(hidden, weight, targets, impl=impl, chunk_size=chunk, reduction=reduction)
    grads = torch.autograd.grad(loss, (hidden, weight), upstream)
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 38])
def test_fused_equals_plain(reduction: str, chunk: int) -> None:
    hidden, weight, targets = inputs()
    upstream = torch.rand(N) + 0.5 if reduction == "none" else torch.tensor(1.7)  # not 1: backward must scale
    ref, ref_grads = loss_and_grads("plain", reduction, chunk, hidden, weight, targets, upstream)
    got, got_grads = loss_and_grads("fused", reduction, chunk, hidden, weight, targets, upstream)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("hidden", "weight"), got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")
    assert got_grads[0][targets == -100].abs().max() == 0  # ignored tokens get no gradient at all


def test_no_gradient_work_without_grad_and_fused_under_no_grad_equals_plain() -> None:
    hidden, weight, targets = inputs()
    with torch.no_grad():
        fused = linear_cross_entropy(hidden, weight, targets, chunk_size=7, reduction="none")
        plain = linear_cross_entropy(hidden, weight, targets, impl="plain", reduction="none")
    assert fused.grad_fn is None
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert (fused[targets == -100] == 0).all()


def test_all_ignored_mean_is_nan_like_plain() -> None:
    hidden, weight, _ = inputs()
    targets = torch.full((N,), -100)
    fused = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
    plain = linear_cross_entropy(hidden, weight, targets, impl="plain")
    assert fused.isnan() and plain.isnan()


def head_flops(targets: torch.Tensor) -> int:
    """Matmul FLOPs of one fused forward + backward over len(targets) rows (V = 1,000), chunks of 64."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    hidden = torch.randn(len(targets), 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(hidden, weight, targets, chunk_size=64).backward()
    return counter.get_total_flops()


def test_only_scored_rows_get_logits() -> None:
    """Recall tasks score 1 position in 8 (MQAR: the answers): 512 rows of which 64 are scored cost what 64
    scored rows cost: the ignored ones get no output-layer work, most of a step at Zoology's vocabulary."""
    one_in_eight = torch.full((512,), -100)
    one_in_eight[::8] = torch.randint(1000, (64,))
    assert head_flops(one_in_eight) == head_flops(one_in_eight[::8]) > 0


def test_huge_losses_stay_exact() -> None:
    """A target whose probability underflows fp32 (loss ~ 300 nats) is taken from logsumexp, not log(0)."""
    hidden, weight, targets = inputs()
    weight = (weight.detach() * 60).requires_grad_()
    ref, ref_grads = loss_and_grads("plain", "none", 7, hidden, weight, targets, torch.ones(N))
    got, got_grads = loss_and_grads("fused", "none", 7, hidden, weight, targets, torch.ones(N))
    assert ref.max() > 150
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_close_to_plain() -> None:
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads("plain", "mean", 7, hidden, weight, targets)
        got, got_grads = loss_and_grads("fused", "mean", 7, hidden, weight, targets)
    assert got_grads[0].dtype == hidden.dtype and got_grads[1].dtype == weight.dtype
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


def test_bad_loss_config_is_one_line(make_cfg) -> None:
    for override, key in (("loss.impl=dense", "loss.impl"), ("loss.chunk_mb=0", "loss.chunk_mb")):
        with pytest.raises(ConfigError, match=key):
            check_run_config(OmegaConf.to_container(make_cfg("scale=tiny", override), resolve=True))


def tiny_module(name: str, tmp_path, impl: str, *overrides: str) -> TrainingModule:
    cfg = OmegaConf.to_container(compose_run(["scale=tiny", f"model={name}", f"loss.impl={impl}",
                                              "loss.chunk_mb=0.00046", *overrides], tmp_path), resolve=True)
    torch.manual_seed(0)
    module = TrainingModule(cfg, {"kind": "char", "chars": "abcdefghijklmnopq"})  # V 17: chunks of 7 rows
    for p in module.parameters():  # trained-like weights: larger than init, so logits are far from uniform
        p.data.add_(torch.randn_like(p) * 0.05)
    return module


def batch(module: TrainingModule, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    T = module.cfg["data"]["seq_len"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(module.tokenizer.vocab_size, (b, T), generator=g)
    y = torch.randint(module.tokenizer.vocab_size, (b, T), generator=g)
    y[0, :7] = -100  # the whole first chunk (7 rows) ignored
    y[2, -1] = -100
    return x, y


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_module_loss_fused_equals_plain(name: str, tmp_path) -> None:
    """Through TrainingModule.loss (training) and token_losses (validation): same values, same gradient on
    every parameter, tied (gpt, efficia, ...) and untied (lumenspark, yinggem) heads alike."""
    fused, plain = tiny_module(name, tmp_path, "fused"), tiny_module(name, tmp_path, "plain")
    plain.load_state_dict(fused.state_dict())
    rows = max(1, int(fused.cfg["loss"]["chunk_mb"] * 2**20) // (4 * fused.net.head_weight.shape[0]))
    xb, yb = batch(fused)
    assert rows < yb.numel() and yb.numel() % rows != 0  # several chunks, a ragged last one
    for module in (fused, plain):
        module.loss((xb, yb)).backward()
    tied = fused.net.head_weight is fused.net.tok_emb.weight
    assert tied == (name not in ("lumenspark", "yinggem"))
    for (pname, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=pname: f"{name} {n}: {m}")
    with torch.no_grad():
        (lf, yf), (lp, yp) = fused.token_losses((xb, yb)), plain.token_losses((xb, yb))
        expected = F.cross_entropy(plain.net(xb).flatten(0, 1), yb.flatten())  # ignore_index=-100
    scored = yf.flatten() != -100
    assert torch.equal(yf, yp) and int(scored.sum()) == yb.numel() - 8 and (lf[~scored] == 0).all()
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lf[scored].mean(), expected)


def test_untied_gpt_head_fused_equals_plain(tmp_path) -> None:
    fused, plain = tiny_module("gpt", tmp_path, "fused"), tiny_module("gpt", tmp_path, "plain")
    for module in (fused, plain):
        module.net.lm_head.weight = torch.nn.Parameter(module.net.tok_emb.weight.detach() * 1.5)
    plain.load_state_dict(fused.state_dict())
    xb, yb = batch(fused)
    for module in (fused, plain):
        module.loss((xb, yb)).backward()
    assert fused.net.head_weight is not fused.net.tok_emb.weight
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def fit_and_validate(module: TrainingModule, xb, yb, tmp_path) -> dict[str, float]:
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    data = DataLoader(TensorDataset(xb, yb), batch_size=len(xb))
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def test_training_and_validation_through_lightning_equal(tmp_path) -> None:
    """Three optimizer steps and a validation with a real Trainer: same weights, same val/loss and val/bpb,
    and val/loss averages over the non-ignored tokens only."""
    fused, plain = tiny_module("gpt", tmp_path, "fused"), tiny_module("gpt", tmp_path, "plain")
    plain.load_state_dict(fused.state_dict())
    xb, yb = batch(fused)
    metrics = [fit_and_validate(m, xb, yb, tmp_path / m.cfg["loss"]["impl"]) for m in (fused, plain)]
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert metrics[0].keys() == metrics[1].keys() >= {"val/loss", "val/bpb"}
    for key in metrics[0]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5)
    with torch.no_grad():
        expected = F.cross_entropy(plain.net(xb).flatten(0, 1), yb.flatten())  # ignore_index=-100
    assert metrics[1]["val/loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_asks_for_last_position_logits_only(name: str, tmp_path) -> None:
    module = tiny_module(name, tmp_path, "fused")
    net = module.net.eval()
    shapes = []
    net.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    prompt = torch.randint(module.tokenizer.vocab_size, (2, 9))
    out = generate(net, prompt, 4, temperature=0.0)
    assert shapes and all(len(s) == 2 for s in shapes)  # [B, V] every call: no [B, T, V] at prefill
    expected = prompt  # greedy decoding with full-sequence logits, no cache
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, net(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_equals_plain() -> None:
    """On a GPU the fused path is Cut Cross-Entropy when installed (pip install .[gpu]), else ours."""
    hidden, weight, targets = (t.detach().cuda() for t in inputs())
    hidden.requires_grad_(), weight.requires_grad_()
    for reduction in ("mean", "none"):
        upstream = torch.ones(N, device="cuda") if reduction == "none" else None
        ref, ref_grads = loss_and_grads("plain", reduction, 7, hidden, weight, targets, upstream)
        got, got_grads = loss_and_grads("fused", reduction, 7, hidden, weight, targets, upstream)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
        for g, r in zip(got_grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-3)
