"""Nothing lost on stop, kill or NaN; exact resume; atomic writes; data that cannot be silently wrong.

Signals are sent for real: in-process from a callback at a chosen step (deterministic), and to a
`train.py` subprocess from outside, as a scheduler would.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from efficia.errors import CheckpointError, ConfigError, DataError, Stopped, TrainingError
from efficia.training.run import train
from tests.conftest import ROOT, require_data

# a tiny run that validates on a few batches and exercises the RNG (dropout)
BASE = ["debug=limit", "logger=csv", "model.dropout=0.1", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "scheduler.warmup_steps=5",
        "callbacks.progress_bar=null"]


class SignalAt(Callback):
    """Test helper: send this process a real signal at the end of one optimizer step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNAt(Callback):
    """Test helper: the optimizer step that makes `step` leaves NaN weights, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).fill_(float("nan"))


class NaNLossAt(Callback):
    """Test helper: one batch whose loss is NaN (the weights stay finite), as a bad batch would give."""

    def __init__(self, step: int) -> None:
        self.step, self.hook = step, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step and self.hook is None:
            # the final norm's output: the output unit's input, whichever loss path (fused or plain) runs
            self.hook = pl_module.net.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))

    def on_train_batch_end(self, *args) -> None:
        if self.hook is not None:
            self.hook.remove()


def signal_at(step: int, signum: int) -> list[str]:
    return [f"+callbacks.signal._target_={__name__}.SignalAt", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signum={int(signum)}"]


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def train_losses(run_dir: str | Path) -> dict[int, str]:
    """step -> train/loss as logged (the CSV's text, so equality is exact)."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 1 + 2: a signal writes last.ckpt at the step it stopped; resuming is bit-exact ----------------

def test_stop_by_signal_or_finish_then_resume_equals_straight_run(make_cfg) -> None:
    """SIGUSR1 at step 13 of 24, resumed: bit-identical to 24 straight steps (weights and every logged loss).
    A run that finished at 16 and is extended to 24 too. (Warmup covers all 24 steps, so the LR schedule
    does not depend on max_steps and the finished-then-extended run can match.)"""
    require_data()
    common = [*BASE, "scheduler.warmup_steps=100"]
    straight_cfg = make_cfg(*common, "trainer.max_steps=24")
    straight = train(straight_cfg)
    full = train_losses(straight_cfg.output_dir)

    stopped_cfg = make_cfg(*common, "trainer.max_steps=24", *signal_at(13, signal.SIGUSR1))
    with pytest.raises(Stopped, match=r"stopped by SIGUSR1 at step 13; last checkpoint: \S+last\.ckpt\. "
                                      r"Resume with: python train\.py .*ckpt_path=") as info:
        train(stopped_cfg)
    assert info.value.exit_code == 128 + signal.SIGUSR1
    last = Path(stopped_cfg.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 13
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers do not outlive the run

    resumed_cfg = make_cfg(*common, "trainer.max_steps=24", f"ckpt_path={last}")
    resumed = train(resumed_cfg)
    assert resumed["global_step"] == 24
    assert_same_weights(weights(resumed["last_ckpt"]), weights(straight["last_ckpt"]))
    after = train_losses(resumed_cfg.output_dir)
    assert sorted(after) == list(range(14, 25)) or sorted(after) == list(range(13, 24))  # CSV step base
    assert all(after[s] == full[s] for s in after), {s: (after[s], full[s]) for s in after if after[s] != full[s]}

    finished = train(make_cfg(*common, "trainer.max_steps=16"))
    assert torch.load(finished["last_ckpt"], weights_only=True)["global_step"] == 16  # end of fit, not step 10
    extended = train(make_cfg(*common, "trainer.max_steps=24", f"ckpt_path={finished['last_ckpt']}"))
    assert_same_weights(weights(extended["last_ckpt"]), weights(straight["last_ckpt"]))


def logged(run_dir: str | Path) -> dict[tuple[str, int], str]:
    """(metric, step) -> value as the CSV logger wrote it, for every train/ and val/ metric and the learning rate."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {(k, int(r["step"])): v for r in csv.DictReader(f) for k, v in r.items()
                if v and k.startswith(("train/", "val/", "lr-"))}


def test_resumed_curves_line_up_step_for_step_with_a_straight_run(make_cfg) -> None:
    """Every metric a resumed run logs (the learning rate too) sits at the step where the uninterrupted run logged it:
    resumed from a signal's save (mid-run) and from the end of a finished run. No dropout, so the
    values themselves are comparable; a curve shifted by one step fails."""
    require_data()
    common = [*BASE, "model.dropout=0.0", "scheduler.warmup_steps=100", "trainer.val_check_interval=5"]
    straight = make_cfg(*common, "trainer.max_steps=16")
    train(straight)
    full = logged(straight.output_dir)
    assert {s for k, s in full if k == "train/loss"} == set(range(16))  # the n-th step at step n-1

    cut = make_cfg(*common, "trainer.max_steps=16", *signal_at(11, signal.SIGUSR1))
    with pytest.raises(Stopped):
        train(cut)
    finished = make_cfg(*common, "trainer.max_steps=11")
    train(finished)
    for first in (f"{cut.output_dir}/checkpoints/last.ckpt", f"{finished.output_dir}/checkpoints/last.ckpt"):
        resumed = make_cfg(*common, "trainer.max_steps=16", f"ckpt_path={first}")
        train(resumed)
        after = logged(resumed.output_dir)
        assert min(s for k, s in after if k == "train/loss") == 11, sorted(after)  # the 12th step
        assert {key: after[key] for key in after} == {key: full.get(key) for key in after}, first


def test_ctrl_c_saves_last_and_exits_130(make_cfg) -> None:
    require_data()
    cfg = make_cfg(*BASE, "trainer.max_steps=12", *signal_at(5, signal.SIGINT))
    with pytest.raises(Stopped, match="stopped by SIGINT at step 5; last checkpoint: ") as info:
        train(cfg)
    assert info.value.exit_code == 130
    assert torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_last_is_written_every_n_steps_and_ckpt_path_last_resumes_it(make_cfg) -> None:
    require_data()
    cfg = make_cfg(*BASE, "trainer.max_steps=12", "trainer.val_check_interval=100",
                   "callbacks.checkpoint.every_n_steps=5", *signal_at(7, signal.SIGUSR1))
    seen: list[int] = []
    original = torch.save

    def spy(obj, f, *a, **k):
        if isinstance(obj, dict) and "global_step" in obj:
            seen.append(obj["global_step"])
        return original(obj, f, *a, **k)

    torch.save = spy
    try:
        with pytest.raises(Stopped):
            train(cfg)
    finally:
        torch.save = original
    assert seen == [5, 7]
    out = cfg.output_dir
    again = make_cfg(*BASE, "trainer.max_steps=12", "ckpt_path=last")
    again.output_dir = out  # as `hydra.run.dir=<that run> ckpt_path=last` gives it
    again.callbacks.checkpoint.dirpath = f"{out}/checkpoints"
    result = train(again)
    assert result["global_step"] == 12 and result["last_ckpt"] == f"{out}/checkpoints/last.ckpt"
    fresh = make_cfg(*BASE, "ckpt_path=last")
    with pytest.raises(CheckpointError, match="holds no last.ckpt; name the run folder"):
        train(fresh)


def test_an_early_stopped_run_leaves_last_ckpt_at_its_last_step(make_cfg) -> None:
    """Lightning writes last.ckpt at a validation only with a new best. Here the last validation is no best
    (mode=max on a falling loss, so early stopping ends the run at step 4, best at step 2): last.ckpt must still
    hold step 4 and its weights, for ckpt_path=last, efficia.load and exports."""
    require_data()
    cfg = make_cfg(*BASE, "trainer.max_steps=20", "trainer.val_check_interval=2", "callbacks.checkpoint.mode=max",
                   "callbacks.early_stopping.mode=max", "callbacks.early_stopping.patience=1")
    result = train(cfg)
    assert result["global_step"] == 4  # stopped early, after one validation without a new best
    assert torch.load(result["best_ckpt"], weights_only=True)["global_step"] == 2
    last = torch.load(result["last_ckpt"], weights_only=True)
    assert last["global_step"] == 4
    assert not torch.equal(last["state_dict"]["net.tok_emb.weight"], weights(result["best_ckpt"])["net.tok_emb.weight"])


# -- signals from outside, to the real command -------------------------------------------------------

def start_train(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.xdist_group("processes")
def test_sigterm_to_train_py_saves_and_exits_143(tmp_path: Path) -> None:
    require_data()
    proc = start_train(tmp_path, "scale=tiny", "logger=csv", "trainer.max_steps=100000",
                       "callbacks.checkpoint.every_n_steps=10", "callbacks.progress_bar=null")
    wait_for(tmp_path / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stopped by SIGTERM at step "), line
    step = int(line.split(" at step ")[1].split(";")[0])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert f"ckpt_path={tmp_path}/checkpoints/last.ckpt" in line and f"hydra.run.dir={tmp_path}" in line


@pytest.mark.xdist_group("processes")
def test_kill_9_leaves_a_loadable_last_checkpoint(tmp_path: Path) -> None:
    require_data()
    proc = start_train(tmp_path, "scale=tiny", "logger=csv", "trainer.max_steps=100000",
                       "callbacks.checkpoint.every_n_steps=3", "callbacks.progress_bar=null")
    last = tmp_path / "checkpoints" / "last.ckpt"
    wait_for(last, proc)
    time.sleep(1.0)  # a few more saves, one may be in flight
    proc.kill()
    proc.communicate()
    step = torch.load(last, weights_only=True)["global_step"]
    assert step > 0 and step % 3 == 0


# -- 4: atomic writes, next to the target ------------------------------------------------------------

SAVER = """
import sys, torch
from efficia.training.checkpointing import atomic_torch_save
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "x": torch.full((4_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.xdist_group("processes")
def test_killing_a_save_never_leaves_a_broken_file(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "ckpt" / "last.ckpt", tmp_path / "tmpdir"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(elsewhere))
    for delay in (0.05, 0.13):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], env=env, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "1"  # one complete save
        time.sleep(delay)  # 16 MB per save: the kill lands inside one
        proc.kill()
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.equal(ckpt["x"], torch.full((4_000_000,), float(ckpt["i"])))
        assert not list(elsewhere.iterdir())  # nothing goes through $TMPDIR
    from efficia.training.checkpointing import remove_stale_temporaries

    remove_stale_temporaries(target.parent)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# -- 3: NaN / Inf ------------------------------------------------------------------------------------

def test_nonfinite_loss_stops_with_one_line_and_keeps_finite_checkpoints(make_cfg) -> None:
    """Step 8 leaves NaN weights exactly when a periodic save and a validation are due: neither last.ckpt
    nor "best" takes them; early stopping ends the run on the NaN val/loss, which must not look like success."""
    require_data()
    cfg = make_cfg(*BASE, "trainer.max_steps=30", "trainer.val_check_interval=4",
                   "callbacks.checkpoint.every_n_steps=4", f"+callbacks.nan._target_={__name__}.NaNAt",
                   "+callbacks.nan.step=8")
    with pytest.raises(TrainingError, match=r"training diverged: the weights are not finite after step 8 .*"
                                            r"last one: \S+last\.ckpt") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the last finite step; step 8 (NaN weights) was not written
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    best = [p for p in ckpts.iterdir() if p.name.startswith("step")]
    assert [p.name.split("-")[0] for p in best] == ["step000004"] and "nan" not in best[0].name


def test_nonfinite_loss_skip_mode_skips_that_step_only(make_cfg, capsys) -> None:
    require_data()
    nan_once = [f"+callbacks.nan._target_={__name__}.NaNLossAt", "+callbacks.nan.step=3"]
    result = train(make_cfg(*BASE, "trainer.max_steps=6", "nonfinite_loss=skip", *nan_once))
    assert result["global_step"] == 6  # the NaN batch did not step; six good steps still ran
    assert "step 4: train/loss is nan; skipping this batch" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in weights(result["last_ckpt"]).values())
    with pytest.raises(TrainingError, match="train/loss is nan at step 4: training diverged"):
        train(make_cfg(*BASE, "trainer.max_steps=6", *nan_once))
    poisoned = [f"+callbacks.nan._target_={__name__}.NaNAt", "+callbacks.nan.step=2"]
    with pytest.raises(TrainingError, match="at step 3 and the weights are no longer finite"):
        train(make_cfg(*BASE, "trainer.max_steps=6", "nonfinite_loss=skip", *poisoned))


def test_huge_lr_is_not_a_success(make_cfg) -> None:
    require_data()
    with pytest.raises(TrainingError, match="is nan at step|is inf at step"):
        train(make_cfg(*BASE, "trainer.max_steps=30", "optimizer.lr=1e6", "trainer.gradient_clip_val=null"))


# -- 5: data -------------------------------------------------------------------------------------------

def test_token_cache_is_keyed_by_the_split(make_cfg) -> None:
    require_data()
    from hydra.utils import instantiate

    def split(fraction: float) -> tuple[int, int]:
        cfg = make_cfg("scale=tiny", f"data.val_fraction={fraction}")
        dm = instantiate(cfg.data, tokenizer={"kind": "char"})
        dm.prepare()
        return len(dm.train_tokens), len(dm.val_tokens)

    n = 1_115_394
    assert split(0.1) == (int(n * 0.9), n - int(n * 0.9))
    assert split(0.5) == (n // 2, n - n // 2)  # not the 0.1 split from the cache
    for bad in ("1.5", "0", "-0.1"):
        with pytest.raises(DataError, match=rf"data.val_fraction={bad}: give the held-out share strictly between"):
            train(make_cfg("debug=fast_dev_run", "logger=csv", f"data.val_fraction={bad}"))


def test_too_little_data_for_one_batch_is_an_error(make_cfg, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question:\n" * 10)  # 440 characters
    with pytest.raises(DataError, match=r"fewer than one batch \(data.batch_size=512"):
        train(make_cfg("debug=limit", "logger=csv", f"data.path={small}", "data.batch_size=512"))


@pytest.mark.parametrize("context, split", [(2_000_000, "training"), (500_000, "validation")])
def test_a_window_longer_than_the_data_stops_at_once(make_cfg, context: int, split: str) -> None:
    """Tiny Shakespeare holds ~1.0M training and ~112k validation characters. A longer window used to run
    Lightning's model summary forward at that length first (minutes, gigabytes): now one line, at once."""
    require_data()
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        train(make_cfg("logger=csv", f"model.max_seq_len={context}"))
    message = str(info.value)
    assert message.startswith(f"the {split} split holds ") and "\n" not in message, message
    assert f"fewer than one window of data.seq_len={context}" in message
    assert time.perf_counter() - start < 60  # seconds: reading and encoding the text, nothing at that length


def test_an_empty_data_file_is_one_line(make_cfg, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as info:
        train(make_cfg("debug=fast_dev_run", "logger=csv", f"data.path={empty}"))
    assert str(info.value) == f"{empty} is empty: point data.path at a plain-text corpus"


# -- 6 + 7: run folders and resume overrides -------------------------------------------------------

def test_a_used_run_folder_is_refused_and_left_intact(make_cfg) -> None:
    require_data()
    first = make_cfg(*BASE, "trainer.max_steps=2")
    train(first)
    out = Path(first.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    second = make_cfg(*BASE, "trainer.max_steps=3")
    second.output_dir = str(out)
    with pytest.raises(ConfigError, match=r"already holds a run .*ckpt_path=last"):
        train(second)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_overrides_it_would_drop(make_cfg) -> None:
    require_data()
    adamw_run = (*BASE, "optimizer=adamw")  # the run every refusal below tries to resume
    first_cfg = make_cfg(*adamw_run, "trainer.max_steps=2")
    first = train(first_cfg)
    lr = first_cfg.optimizer.lr
    with pytest.raises(CheckpointError, match=rf"cannot change \(optimizer.lr={lr} there vs 0.01 here\)"):
        train(make_cfg(*adamw_run, "optimizer.lr=1e-2", f"ckpt_path={first['last_ckpt']}"))
    with pytest.raises(CheckpointError, match=r"optimizer._target_='torch.optim.AdamW' there vs "
                                              r"'torch.optim.Adafactor' here"):
        train(make_cfg(*BASE, "optimizer=adafactor", f"ckpt_path={first['last_ckpt']}"))
    with pytest.raises(CheckpointError, match="trained with tokenizer char65, this run's tokenizer= and data "
                                              "give gpt2"):
        train(make_cfg(*adamw_run, "tokenizer=gpt2", f"ckpt_path={first['last_ckpt']}"))
    resumed = train(make_cfg(*adamw_run, "trainer.max_steps=4", "trainer.val_check_interval=2",
                             f"ckpt_path={first['last_ckpt']}"))  # trainer.* is applied
    assert resumed["global_step"] == 4
