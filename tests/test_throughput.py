"""Measured FLOPs and MFU, the validation of the final weights, plain progress lines, quiet Lightning."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from efficia.build import build_model
from efficia.config import compose_run
from efficia.models import MODELS
from efficia.models.kernels import attend, attention_with_dropout, sdpa
from efficia.models.layers import Dropout, dropout
from efficia.training.callbacks import PlainProgress, progress_bar
from efficia.training.run import train
from efficia.training.throughput import compute_dtype, gpu_peak, measure_cpu_peak, training_flops_per_token
from tests.conftest import EXTERNAL_TABLE, TINY_VOCAB, require_data, tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt_matmul_flops_per_token(cfg: dict, vocab_size: int, seq_len: int) -> int:
    """By hand, for full causal attention without GQA: weights 2·(12·L·d² + V·d) per token forward
    (q, k, v, proj, 4d MLP, tied head), attention 2·2·T·d per layer (QKᵀ and AV over the full T×T, as
    SDPA's FLOP formula counts causal), backward twice the forward."""
    d, n_layer = cfg["d_model"], cfg["n_layer"]
    forward = 2 * (12 * n_layer * d * d + vocab_size * d) + 4 * n_layer * seq_len * d
    return 3 * forward


@pytest.mark.parametrize("seq_len", [16, 32])
def test_measured_gpt_flops_match_the_hand_count(seq_len: int) -> None:
    cfg = tiny_model_cfg("gpt")
    measured = training_flops_per_token(cfg, TINY_VOCAB, seq_len)
    assert measured == gpt_matmul_flops_per_token(cfg, TINY_VOCAB, seq_len)


def test_flops_follow_the_architecture_not_a_formula() -> None:
    """A full-attention model pays per token for every earlier position; a sliding window and a
    segment-recurrent model do not, so their measured FLOPs per token stay flat as T grows."""
    def growth(name: str, *overrides: str) -> float:
        cfg = tiny_model_cfg(name, "model.max_seq_len=1024", *overrides)
        return training_flops_per_token(cfg, TINY_VOCAB, 1024) / training_flops_per_token(cfg, TINY_VOCAB, 128)

    assert growth("gpt") > 1.5
    assert growth("yinggem") < 1.05
    assert growth("efficia") < 1.1


@pytest.mark.parametrize("case", [(name,) for name in sorted(MODELS)]
                         + [("efficientlm", f"model.external.source={EXTERNAL_TABLE}")], ids=str)
def test_every_model_counts_flops_on_the_meta_device(case: tuple[str, ...]) -> None:
    per_token = training_flops_per_token(tiny_model_cfg(*case), TINY_VOCAB, 32)
    params = sum(p.numel() for p in build_model(tiny_model_cfg(*case), TINY_VOCAB).parameters())
    assert 2 * params < per_token < 12 * params + 1e6  # about 6 FLOPs per weight, plus attention


def test_gpu_peaks_come_from_the_table() -> None:
    assert gpu_peak("NVIDIA GeForce RTX 3060", "fp32") == pytest.approx(12.7e12)
    assert gpu_peak("NVIDIA GeForce RTX 3060", "bf16") == pytest.approx(25.5e12)
    assert gpu_peak("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2e12)
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)  # not the SXM figure
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak("Some Future GPU", "bf16") is None


def test_compute_dtype_follows_the_precision_setting() -> None:
    assert compute_dtype("32-true", "cpu") == "fp32"
    assert compute_dtype("bf16-mixed", "cuda") == "bf16"
    assert compute_dtype("bf16-true", "cpu") == "bf16"
    assert compute_dtype("16-mixed", "cuda") == "fp16"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert compute_dtype("32-true", "cuda") == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype("32-true", "cuda") == "fp32"
    finally:
        torch.set_float32_matmul_precision(previous)


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def peaks(caplog) -> list[float]:
    """The peaks MFU was logged against, in FLOP/s: the one measured at start, and any measured again later (a
    busy start understates a CPU's peak)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput: ")]
    return [float(p.replace(",", "")) * 1e9 for line in lines for p in re.findall(r"peak ([\d,.]+) GFLOP/s", line)]


def assert_mfu(mfu: float, flops_per_second: float, peaks: list[float]) -> None:
    """MFU is the achieved FLOP/s over the peak in effect (the start's, or a later one), and never above 100%."""
    assert peaks and mfu <= 1
    assert any(mfu == pytest.approx(flops_per_second / peak, rel=0.01) for peak in peaks), (mfu, peaks)


def test_a_run_logs_mfu_and_ends_by_validating_its_final_weights(make_cfg, capfd, caplog) -> None:
    """7 steps with validation every 3: Lightning alone validates at 3 and 6 and ends at 7 unvalidated."""
    require_data()
    cfg = make_cfg("scale=tiny", "logger=csv", "trainer.max_steps=7", "trainer.val_check_interval=3",
                   "trainer.limit_val_batches=4", "trainer.log_every_n_steps=1", "callbacks.progress_bar.plain_every=2")
    result = train(cfg)
    captured = capfd.readouterr()
    out = captured.out
    rows = csv_rows(Path(cfg.output_dir))
    val_steps = [int(r["step"]) for r in rows if r.get("val/loss")]
    assert val_steps == [2, 5, 6]  # Lightning's step column counts from 0: steps 3, 6 and the final 7
    assert result["global_step"] == 7
    final = [r for r in rows if r.get("val/loss")][-1]
    assert result["metrics"]["val/loss"] == pytest.approx(float(final["val/loss"]))
    assert f"done: 7 steps; val/loss {result['metrics']['val/loss']:.4f}" in out

    # MFU is tokens/s x the counted FLOPs per token / the peak measured at start, on every logged step
    flops = training_flops_per_token(cfg.model, 65, cfg.data.seq_len)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput: "))
    assert f"{flops / 1e6:,.2f} MFLOP per token" in line
    logged = [r for r in rows if r.get("mfu")]
    assert len(logged) >= 5
    for r in logged:
        assert_mfu(float(r["mfu"]), float(r["tok/s"]) * flops, peaks(caplog))

    # stdout is not a terminal under pytest: plain progress lines, no Lightning tips or internal deprecations
    assert "step 2/7 | loss " in out and "step 7/7 | loss " in out and "tok/s | MFU " in out
    assert "step 6: val/loss " in out
    noise = out + captured.err + caplog.text
    assert "Tip:" not in noise and "LeafSpec" not in noise and "TPU available" not in noise


def test_mfu_on_recall_data_counts_the_head_for_answer_rows_only(make_cfg, caplog) -> None:
    """MQAR scores 8 positions of 32 here, and the fused output unit gives logits to those only: MFU counts the
    head's FLOPs for them, not for the other 24 (experiment=recall showed an MFU of 193% when it did)."""
    cfg = make_cfg("experiment=recall", "scale=tiny", "logger=csv", "model.max_seq_len=64", "data.seq_len=32",
                   "data.num_kv_pairs=8", "data.vocab_size=512", "data.num_test=40", "data.test=null",
                   "data.batch_size=8", "trainer.max_steps=4", "trainer.val_check_interval=100",
                   "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0")
    train(cfg)
    head = 6 * 512 * cfg.model.d_model  # the tied head's V x C weights: 2 FLOPs each forward, 4 backward
    flops = training_flops_per_token(cfg.model, 512, 32) - head * 24 / 32
    logged = [r for r in csv_rows(Path(cfg.output_dir)) if r.get("mfu")]
    assert len(logged) >= 2
    for r in logged:
        assert_mfu(float(r["mfu"]), float(r["tok/s"]) * flops, peaks(caplog))


@pytest.mark.parametrize("busy", ["at start", "throughout"])
def test_no_mfu_above_100_percent_after_a_busy_start(make_cfg, monkeypatch, caplog, busy: str) -> None:
    """A CPU peak measured while the machine is busy understates it (experiment=recall logged MFU 190-200%). The
    busy machine is the one thing stood in for: the peak measurement reads 1/1000 of the CPU's, at start only (the
    peak is measured again and MFU is right) or every time (one line says why, and no MFU is logged)."""
    from efficia.training import throughput

    real, measured = throughput.measure_cpu_peak, []

    def busy_machine(dtype: str = "fp32", **kwargs) -> float:
        measured.append(real(dtype, **kwargs))
        return measured[-1] / 1000 if busy == "throughout" or len(measured) == 1 else measured[-1]

    monkeypatch.setattr(throughput, "measure_cpu_peak", busy_machine)
    cfg = make_cfg("scale=tiny", "logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=100",
                   "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0")
    train(cfg)
    logged = [float(r["mfu"]) for r in csv_rows(Path(cfg.output_dir)) if r.get("mfu")]
    assert len(measured) == 2 and "measured again" in caplog.text
    if busy == "at start":
        assert len(logged) >= 2 and max(logged) <= 1
    else:
        assert not logged and "so MFU is not logged from here on" in caplog.text


def test_the_final_validation_is_of_the_saved_weights(make_cfg) -> None:
    """The returned val/loss is what a fresh validation of last.ckpt gives: what sweeps minimise is what was saved."""
    require_data()
    cfg = make_cfg("scale=tiny", "logger=csv", "trainer.max_steps=5", "trainer.val_check_interval=4",
                   "trainer.limit_val_batches=3", "callbacks.checkpoint.every_n_steps=null")
    result = train(cfg)
    import lightning as L
    from hydra.utils import instantiate

    from efficia.training.module import TrainingModule

    module = TrainingModule.load_from_checkpoint(result["last_ckpt"], map_location="cpu", weights_only=False)
    dm = instantiate(cfg.data, tokenizer={"kind": "char"})
    check = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=3)
    [fresh] = check.validate(module, datamodule=dm, verbose=False)
    assert result["metrics"]["val/loss"] == pytest.approx(fresh["val/loss"], rel=1e-6)


def test_progress_is_a_live_bar_only_on_a_terminal(monkeypatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar(refresh_rate=1, plain_every=10), PlainProgress)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar(refresh_rate=1, plain_every=10), RichProgressBar)


def test_the_model_summary_counts_the_forward_flops_of_one_window(tmp_path: Path) -> None:
    """Lightning's summary ran no forward ("Total FLOPs: 0"); with one training window as example input it
    counts that window's forward FLOPs."""
    from lightning.pytorch.utilities.model_summary import ModelSummary
    from omegaconf import OmegaConf

    from efficia.training.module import TrainingModule

    for name in sorted(MODELS):  # a model whose forward breaks the counter's autograd hooks would fail the run here
        cfg = OmegaConf.to_container(compose_run(["scale=tiny", f"model={name}"], tmp_path), resolve=True)
        module = TrainingModule(cfg, {"kind": "char", "chars": "abcdefghij"})
        seq_len, vocab = cfg["data"]["seq_len"], 10
        flops = ModelSummary(module).total_flops
        if name == "gpt":
            assert flops == seq_len * gpt_matmul_flops_per_token(cfg["model"], vocab, seq_len) // 3
        assert flops > 0, name


# -- hot paths -------------------------------------------------------------------------------------

def test_cpu_dropout_keeps_dropouts_contract() -> None:
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.2)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.01  # drops a share p
    assert torch.allclose(y[kept], torch.tensor(1 / 0.8))  # scales the rest by 1/(1-p): the mean is kept
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    layer = Dropout(0.2).eval()
    assert layer(x) is x


@pytest.mark.parametrize(("q_len", "k_len", "kv_heads"), [(7, 7, 4), (3, 9, 4), (5, 5, 2), (1, 6, 1)])
def test_attention_with_dropout_is_sdpa_when_nothing_is_dropped(q_len: int, k_len: int, kv_heads: int) -> None:
    """The CPU dropout path computes causal attention (bottom-right aligned, GQA) exactly as SDPA does."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k, v = (torch.randn(2, kv_heads, k_len, 8, generator=gen) for _ in range(2))
    expected = attend(q, k, v)  # SDPA, no dropout
    torch.testing.assert_close(attention_with_dropout(q, k, v, 1e-12), expected)
    torch.testing.assert_close(attention_with_dropout(q, k, v, 1e-12, scale=0.3), attend(q, k, v, scale=0.3))


def test_narrow_values_take_the_fused_cpu_kernel() -> None:
    """MLA's values are narrower than its keys (decoupled RoPE): padded, SDPA keeps its fused kernel instead of
    materialising the [T, T] scores, and the result is the attention of the unpadded values."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 16, 12, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 16, 8, generator=gen)
    with FlopCounterMode(display=False) as counter:
        out = sdpa(q, k, v, is_causal=True)
    assert "_scaled_dot_product_flash_attention_for_cpu" in str(counter.get_flop_counts()["Global"])
    scores = (q @ k.transpose(-2, -1)) / 12**0.5
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)


def test_logged_train_values_belong_to_the_step_they_are_written_at(make_cfg) -> None:
    """Values are logged only on the steps Lightning writes (and the last): a value logged a step early would be
    written stale, nine steps old at the default log_every_n_steps."""
    require_data()
    cfg = make_cfg("scale=tiny", "logger=csv", "trainer.max_steps=7", "trainer.log_every_n_steps=3",
                   "trainer.val_check_interval=7", "trainer.limit_val_batches=1")
    result = train(cfg)
    per_step = cfg.data.batch_size * cfg.data.seq_len
    rows = [r for r in csv_rows(Path(cfg.output_dir)) if r.get("train/tokens")]
    assert [(int(r["step"]) + 1, float(r["train/tokens"])) for r in rows] == [(s, s * per_step) for s in (3, 6, 7)]
    assert all(r.get("tok/s") and r.get("mfu") for r in rows)
    assert result["metrics"]["train/tokens"] == 7 * per_step  # the returned metrics are the last step's


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone(monkeypatch) -> None:
    """The peak is measured at the start of every fit and draws a clock-dependent number of matrices: from the
    global RNG that shifted the run's dropout masks, so a straight run and an interrupted one differed."""
    ticks = iter(range(10**6))
    monkeypatch.setattr("efficia.training.throughput.time.perf_counter", lambda: next(ticks) * 1e-3)  # a slow clock
    state = torch.get_rng_state()
    assert measure_cpu_peak("fp32", max_n=512, min_seconds=1.0) > 0
    assert torch.equal(torch.get_rng_state(), state)
