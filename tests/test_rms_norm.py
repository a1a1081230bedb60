"""layers.rms_norm: the same values and gradients as the previous RMSNorm (F.rms_norm, kept here as the
reference) at several shapes and dtypes, under bf16 autocast too, keeping only x and rstd for backward, on fake
tensors and the meta device as well, and through whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from efficia.models import layers
from efficia.models.layers import RMSNorm, rms_norm
from tests.conftest import TINY_VOCAB
from tests.memory import saved_tensors
from tests.trained_like import randomise

EPS = 1e-6
# training [B, T, D], decoding [B, 1, D], a flat [N, D], a head-shaped [B, T, H, D] and an unbatched [D]
SHAPES = [(2, 7, 48), (3, 1, 48), (5, 24), (2, 3, 4, 16), (32,)]


def reference_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The previous RMSNorm.forward: torch's rms_norm, which on the CPU keeps x and x·rstd for backward."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """x at a trained-like scale (rows of different sizes), a norm gain in [0.3, 2] and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * (0.1 + 4 * torch.rand(shape[:-1] + (1,), generator=gen,
                                                                                       dtype=torch.float64))
    weight = 0.3 + 1.7 * torch.rand(shape[-1], generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), grad.to(dtype)


def forward_and_grads(fn, x: Tensor, weight: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x, weight = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    out = fn(x, weight, EPS)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_equals_the_previous_rms_norm(shape) -> None:
    got = forward_and_grads(rms_norm, *inputs(shape, torch.float64))
    want = forward_and_grads(reference_rms_norm, *inputs(shape, torch.float64))
    for name, a, b in zip(("output", "grad x", "grad weight"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10 * b.abs().max().item(), rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_equals_the_previous_rms_norm(shape) -> None:
    got = forward_and_grads(rms_norm, *inputs(shape, torch.float32))
    want = forward_and_grads(reference_rms_norm, *inputs(shape, torch.float32))
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)  # the same operations in the same order
    for name, a, b in zip(("grad x", "grad weight"), got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the reference, bf16 x
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_under_bf16_autocast(shape, x_dtype) -> None:
    """CPU autocast leaves rms_norm alone: an fp32 residual stream, or a bf16 latent out of a linear, meets fp32
    weights; the output keeps x's dtype and the gradients are those of the previous formulation."""
    x, weight, grad = inputs(shape, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_and_grads(rms_norm, x.to(x_dtype), weight, grad)
        want = forward_and_grads(reference_rms_norm, x.to(x_dtype), weight, grad)
    assert got[0].dtype == want[0].dtype == x_dtype
    assert got[1].dtype == x_dtype and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2  # bf16 gradients: one rounding of a differently summed value
    for name, a, b in zip(("grad x", "grad weight"), got[1:], want[1:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * b.abs().max().item(), rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_x_and_rstd(x_dtype) -> None:
    """Backward keeps x itself (its storage, in its dtype: no fp32 copy) and rstd [..., 1], besides the weight
    (a parameter, kept anyway); the previous RMSNorm kept an fp32 x and x·rstd as well."""
    x = torch.randn(2, 9, 40).to(x_dtype).requires_grad_(True)
    weight = torch.nn.Parameter(torch.rand(40) + 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x_dtype == torch.bfloat16):
        _, kept = saved_tensors(lambda: rms_norm(x, weight, EPS))
        _, kept_before = saved_tensors(lambda: reference_rms_norm(x, weight, EPS))
    assert sorted(kept) == sorted([((2, 9, 40), x.untyped_storage().nbytes()), ((2, 9, 1), 2 * 9 * 4),
                                   ((40,), weight.untyped_storage().nbytes())]), kept
    x_sized = [b for shape, b in kept_before if shape == (2, 9, 40)]
    assert x_sized == [2 * 9 * 40 * 4] * 2, kept_before  # what the rewrite removes: fp32 x and x·rstd


def test_rms_norm_module_uses_it_in_training_only() -> None:
    """RMSNorm goes through the lean function when autograd records (the CPU); no-grad calls stay on torch's."""
    norm = RMSNorm(16)
    x = torch.randn(3, 16, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "_RMSNormBackward"
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference_rms_norm(x, norm.weight, norm.eps), atol=0, rtol=0)


def test_on_fake_tensors_and_the_meta_device() -> None:
    """efficia.plan.measure counts memory on fake tensors and builds models on the meta device: both run it, backward
    included, with the shapes and dtypes of real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for context, device in ((FakeTensorMode(allow_non_fake_inputs=True), "cpu"), (torch.device("meta"), "meta")):
        with context:
            norm = RMSNorm(24)
            x = torch.randn(2, 5, 24, device=device, requires_grad=True)
            out = norm(x)
            assert type(out.grad_fn).__name__ == "_RMSNormBackward"
            out.sum().backward()
            assert x.grad.shape == x.shape and norm.weight.grad.shape == (24,)
            assert out.dtype == x.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["yinggem", "efficia", "lumenspark", "efficientlm", "optimus"])
def test_models_equal_the_previous_rms_norm(name, tiny_model, monkeypatch) -> None:
    """The five models that use RMSNorm, trained-like in float64: the same logits and parameter gradients as
    with the previous RMSNorm."""
    model = randomise(tiny_model(name)).double().train()
    idx = torch.randint(TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    projection = torch.randn(2, 12, TINY_VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run() -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        (logits * projection).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got = run()
    with monkeypatch.context() as patch:
        patch.setattr(layers, "rms_norm", reference_rms_norm)
        want = run()
    assert got[1].keys() == want[1].keys()
    norm_gains = [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    assert norm_gains, "the model has RMSNorms"
    for label, a, b in [("logits", got[0], want[0]), *((f"grad {n}", got[1][n], want[1][n]) for n in want[1])]:
        torch.testing.assert_close(a, b, atol=1e-10 * max(b.abs().max().item(), 1.0), rtol=0,
                                   msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.cuda
def test_cuda_rms_norm_is_fused() -> None:
    """On CUDA `rms_norm` hands over to F.rms_norm: its fused kernel keeps only input and rstd (fp32 under
    autocast, which runs rms_norm in fp32 there)."""
    for autocast in (False, True):
        x = torch.randn(4, 64, 256, device="cuda").requires_grad_(True)
        weight = torch.nn.Parameter(torch.ones(256, device="cuda"))
        x_in = x.bfloat16() if autocast else x
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            _, kept = saved_tensors(rms_norm, x_in, weight, EPS)
        big = [b for shape, b in kept if shape == (4, 64, 256)]
        assert big == [4 * 64 * 256 * 4], kept
