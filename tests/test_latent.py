"""The shared latent-attention pieces (efficia/models/latent.py): the absorbed path equals the expanded
path for every kind of mask a caller may give, over any latent sequence, and follows the current weights."""

from __future__ import annotations

import pytest
import torch

from efficia.errors import ConfigError
from efficia.models.kernels import causal_mask
from efficia.models.latent import LatentHeads, LatentKV, LatentQuery, LatentState
from efficia.models.layers import rope_tables

B, H, D, DV, DC, DR, DM = 2, 3, 8, 6, 10, 4, 24


def parts(T: int, S: int, d_rope: int = DR, v_head_dim: int = DV, seed: int = 0):
    torch.manual_seed(seed)
    heads = LatentHeads(H, DC, D, v_head_dim)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    q_c, c_kv = torch.randn(B, H, T, D), torch.randn(B, S, DC)
    q_r = torch.randn(B, H, T, d_rope) if d_rope else None
    k_r = torch.randn(B, S, d_rope) if d_rope else None
    return heads, q_c, q_r, c_kv, k_r


def reference(heads, q_c, q_r, c_kv, k_r, allowed, scale):
    """Plain softmax attention written out per head, the definition both paths must meet."""
    k, v = heads.expand(c_kv)
    scores = q_c @ k.transpose(-1, -2)
    if q_r is not None:
        scores = scores + q_r @ k_r.unsqueeze(1).transpose(-1, -2)
    scores = (scores * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def both(heads, *args, **kwargs):
    return (heads.attend(*args, absorbed=True, **kwargs), heads.attend(*args, absorbed=False, **kwargs))


@pytest.mark.parametrize(("T", "S"), [(7, 7), (3, 9), (1, 9)])
def test_causal_paths_agree_with_the_definition(T: int, S: int) -> None:
    heads, q_c, q_r, c_kv, k_r = parts(T, S)
    want = reference(heads, q_c, q_r, c_kv, k_r, causal_mask(T, S), (D + DR) ** -0.5)
    absorbed, expanded = both(heads, q_c, q_r, c_kv, k_r, is_causal=True)
    assert absorbed.shape == (B, H, T, DV)
    torch.testing.assert_close(expanded, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, want, atol=1e-5, rtol=0)


def stride_like_mask(T: int, S: int, seed: int) -> torch.Tensor:
    """An arbitrary non-causal pattern (as MTLA's stride-aware mask is), no row fully masked."""
    allowed = torch.rand(T, S, generator=torch.Generator().manual_seed(seed)) < 0.5
    allowed[torch.arange(T), torch.arange(T) % S] = True
    return allowed


@pytest.mark.parametrize("shape", ["TS", "HTS", "B1TS", "BHTS"])
def test_explicit_boolean_masks_of_every_broadcast_shape(shape: str) -> None:
    T, S = 5, 4
    heads, q_c, q_r, c_kv, k_r = parts(T, S)
    full = torch.stack([torch.stack([stride_like_mask(T, S, 10 * b + h) for h in range(H)]) for b in range(B)])
    if shape == "TS":
        full = full[:1, :1].expand(B, H, T, S)
    elif shape == "HTS":  # torch broadcasting: a 3-D mask is per head, shared over the batch
        full = full[:1].expand(B, H, T, S)
    elif shape == "B1TS":
        full = full[:, :1].expand(B, H, T, S)
    mask = {"TS": full[0, 0], "HTS": full[0], "B1TS": full[:, :1], "BHTS": full}[shape]
    want = reference(heads, q_c, q_r, c_kv, k_r, full, (D + DR) ** -0.5)
    absorbed, expanded = both(heads, q_c, q_r, c_kv, k_r, mask=mask)
    torch.testing.assert_close(expanded, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, want, atol=1e-5, rtol=0)


def test_additive_mask_custom_scale_and_no_rope_part() -> None:
    T, S = 4, 6
    heads, q_c, q_r, c_kv, k_r = parts(T, S, d_rope=0, v_head_dim=D)
    allowed = stride_like_mask(T, S, 3)
    additive = torch.zeros(T, S).masked_fill(~allowed, float("-inf"))
    want = reference(heads, q_c, None, c_kv, None, allowed, 0.3)
    absorbed, expanded = both(heads, q_c, q_r, c_kv, k_r, mask=additive, scale=0.3)
    assert q_r is None and absorbed.shape == (B, H, T, D)
    torch.testing.assert_close(expanded, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(absorbed, want, atol=1e-5, rtol=0)


def test_absorbed_path_reads_the_current_weights() -> None:
    heads, q_c, q_r, c_kv, k_r = parts(1, 5)
    before = heads.attend(q_c, q_r, c_kv, k_r, absorbed=True)
    with torch.no_grad():
        heads.uk.weight.mul_(1.5)
        heads.uv.weight.add_(0.1)
    after = heads.attend(q_c, q_r, c_kv, k_r, absorbed=True)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, heads.attend(q_c, q_r, c_kv, k_r, absorbed=False), atol=1e-5, rtol=0)


def test_gradients_flow_through_both_paths_alike() -> None:
    heads, q_c, q_r, c_kv, k_r = parts(5, 5)
    grads = []
    for absorbed in (True, False):
        heads.zero_grad()
        heads.attend(q_c, q_r, c_kv, k_r, absorbed=absorbed, is_causal=True).square().sum().backward()
        grads.append(torch.cat([heads.uk.weight.grad.flatten(), heads.uv.weight.grad.flatten()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_projections_shapes_rope_and_state() -> None:
    torch.manual_seed(0)
    T = 6
    x = torch.randn(B, T, DM)
    rope = rope_tables(DR, 10000.0, 3, T, x.device)
    q_c, q_r = LatentQuery(DM, H, D, DR, d_q=12)(x, rope)
    assert q_c.shape == (B, H, T, D) and q_r.shape == (B, H, T, DR)
    kv = LatentKV(DM, DC, DR)
    c_kv, k_r = kv(x, rope)
    plain = kv(x)[1]
    assert c_kv.shape == (B, T, DC) and k_r.shape == (B, T, DR) and not torch.allclose(k_r, plain)
    assert LatentQuery(DM, H, D, 0, d_q=None)(x)[1] is None
    state = LatentState(B, DC, DR, x.device, torch.float32)
    state.update(c_kv[:, :2], k_r[:, :2])
    held = state.update(c_kv[:, 2:], k_r[:, 2:])
    torch.testing.assert_close(held[0], c_kv)
    torch.testing.assert_close(held[1], k_r)
    assert state.c_kv.nbytes + state.k_r.nbytes == B * LatentState.nbytes(T, DC, DR, torch.float32)


def test_mask_and_causal_flag_together_is_a_clear_error() -> None:
    heads, q_c, q_r, c_kv, k_r = parts(2, 2)
    with pytest.raises(ConfigError, match="either a mask or is_causal"):
        heads.attend(q_c, q_r, c_kv, k_r, absorbed=True, mask=causal_mask(2, 2), is_causal=True)
