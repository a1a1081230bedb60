"""Model FLOPs utilisation from measured numbers on both sides of the ratio.

FLOPs: PyTorch's FlopCounterMode (through Lightning's `measure_flops`) counts one forward + backward of
one training window on the meta device, so sliding-window, linear, latent and block-compressed attention
are counted as they actually run; `6N + 12·L·d·T` is right only for full attention.
Peak: on a CPU it is measured (a square matmul in the compute dtype, on the threads torch uses); on a GPU it
comes from `GPU_PEAK_TFLOPS` (dense figures from NVIDIA's datasheets), and an unknown card has no MFU.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from torch.utils.flop_counter import flop_registry, register_flop_formula

from efficia.build import build_model

# Dense tensor-core TFLOPS (fp32 accumulate) for bf16/fp16 and tf32; plain fp32 without tensor cores.
# GeForce cards run fp16/bf16 with fp32 accumulate at half their fp16-accumulate rate: that is the rate
# PyTorch gets, so that is the figure here.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "rtx 3060": {"fp32": 12.7, "tf32": 12.7, "bf16": 25.5, "fp16": 25.5},
    "rtx 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0},
    "rtx 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "a100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "h100 pcie": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "h100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "h200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
}

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...]) -> int:
    """QKᵀ and AV over the full Tq×Tk grid (how torch counts SDPA, causal or not); query heads may
    outnumber key heads (GQA)."""
    *batch_heads, t_q, d = query_shape
    t_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * int(torch.Size(batch_heads).numel()) * t_q * t_k * (d + d_v)


# torch counts its CUDA attention kernels but not the CPU one, so a model summary on a CPU left attention out
CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if CPU_ATTENTION not in flop_registry:
    @register_flop_formula(CPU_ATTENTION)
    def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return attention_flops(query_shape, key_shape, value_shape)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
        return 2 * attention_flops(query_shape, key_shape, value_shape)  # dQ, dK, dV and dP: twice the forward


def compute_dtype(precision: str, device_type: str) -> str:
    """The dtype matmuls run in under a Lightning precision setting ("32-true", "bf16-mixed", ...)."""
    precision = str(precision)
    if "bf16" in precision:
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if device_type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def training_flops_per_token(model_cfg: Mapping[str, Any], vocab_size: int, seq_len: int) -> float:
    """Forward + backward FLOPs per token of one `seq_len` window, counted on the meta device (no memory,
    no time): the model is built from its config exactly as training builds it."""
    net = build_model(model_cfg, vocab_size, device="meta")
    idx = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    net.train()

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())

    return measure_flops(net, lambda: net(idx), loss) / seq_len


@functools.lru_cache(maxsize=64)
def cached_flops_per_token(model_json: str, vocab_size: int, seq_len: int) -> float:
    """training_flops_per_token of a model config given as sorted JSON: counted once per process (a run's
    throughput, record and FLOPs budget, and the plan's many candidates, all ask)."""
    return training_flops_per_token(json.loads(model_json), vocab_size, seq_len)


def run_flops_per_token(cfg: Mapping[str, Any], vocab_size: int) -> tuple[float, int]:
    """(training FLOPs per token, the window they are counted at) of a run's config: its data's seq_len,
    else the model's context."""
    seq_len = cfg.get("data", {}).get("seq_len") or cfg["model"]["max_seq_len"]
    return cached_flops_per_token(json.dumps(dict(cfg["model"]), sort_keys=True), vocab_size, seq_len), seq_len


def measure_cpu_peak(dtype: str = "fp32", max_n: int = 2048, min_seconds: float = 0.05, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` n×n matmuls in `dtype`, on the threads torch is using now. n doubles from
    256 until one matmul takes `min_seconds` (or n reaches max_n), so a dtype this CPU only emulates (bf16
    without native support: about 1 GFLOP/s here) is measured in a fraction of a second too.

    The matrices come from a private generator: how many are drawn depends on the clock, and drawing them
    from the global RNG shifted every dropout mask of the run after it (runs, and resumes, not reproducible)."""
    n, gen = 256, torch.Generator().manual_seed(0)
    while True:
        a, b = (torch.randn(n, n, dtype=DTYPES[dtype], generator=gen) for _ in range(2))
        a @ b  # warm-up: thread pool, packing buffers
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start >= min_seconds or n >= max_n:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def gpu_peak(device_name: str, dtype: str) -> float | None:
    """Table lookup by the CUDA device name (longest matching key first), in FLOP/s; None if unknown."""
    name = device_name.lower()
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_TFLOPS[key][dtype] * 1e12
    return None


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, dtype)
        source = f"{dtype} datasheet peak of {name}" if peak else f"{name} is not in GPU_PEAK_TFLOPS"
        return peak, source
    if device.type == "cpu":
        return measure_cpu_peak(dtype), f"{dtype} matmul measured on this CPU, {torch.get_num_threads()} threads"
    return None, f"no peak known for {device.type}"
