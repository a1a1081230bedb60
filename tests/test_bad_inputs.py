"""Every bad input is one clear line (what is wrong + how to fix), never a traceback: train.py, sample.py and
the Python API; plus the numerics of top-p at a GPT-2-sized vocabulary."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import efficia
from efficia.config import compose_run
from efficia.errors import ConfigError, EfficiaError
from efficia.inference.generate import apply_top_p, next_token
from efficia.inference.sampling_cli import sample
from efficia.training.run import train
from tests.conftest import require_data

# -- top-p ------------------------------------------------------------------------------------------


def exact_top_p_count(logits: torch.Tensor, p: float) -> int:
    """Smallest n whose n most likely tokens reach p, summed exactly (math.fsum) from float64 probabilities."""
    probs = sorted(logits.double().softmax(-1).tolist(), reverse=True)
    lo, hi = 1, len(probs)
    while lo < hi:
        mid = (lo + hi) // 2
        if math.fsum(probs[:mid]) >= p:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_top_p_cut_is_exact_at_gpt2_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 2.0, 3.0):
        logits = torch.randn(1, 50257, generator=g) * scale
        for p in (0.9, 0.99, 0.999):
            kept = int(torch.isfinite(apply_top_p(logits, p)).sum())
            assert kept == exact_top_p_count(logits[0], p), (scale, p)


def test_top_p_zero_keeps_the_most_likely_token() -> None:
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(1))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    picks = next_token(logits, seen, temperature=1.0, top_k=None, top_p=0.0, repetition_penalty=1.0)
    assert torch.equal(picks, logits.argmax(-1))


# -- the Python API and sample.py --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    require_data()
    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    return train(compose_run(["debug=limit", "logger=csv", "trainer.max_steps=2"], out))["last_ckpt"]


@pytest.mark.parametrize(("option", "message"), [
    ({"num_samples": 0}, "num_samples=0: give a whole number >= 1"),
    ({"repetition_penalty": 0}, "repetition_penalty=0: give a number > 0"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1: give a whole number >= 0"),
    ({"top_p": 1.5}, r"top_p=1.5: give a number in \[0, 1\]"),
    ({"top_k": -1}, "top_k=-1: give a whole number >= 1"),
    ({"temperature": "hot"}, "temperature='hot': give a number >= 0"),
    ({"seed": "abc"}, "seed='abc': give a whole number >= 0"),
    ({"top_q": 0.5}, r"unknown sampling option\(s\) \['top_q'\]"),
])
def test_python_api_refuses_bad_sampling_in_one_line(ckpt: str, option: dict, message: str) -> None:
    model = efficia.load(ckpt)
    with pytest.raises(ConfigError, match=message) as info:
        model.generate("ROMEO:", **option)
    assert "\n" not in str(info.value)


def test_python_api_top_p_zero_is_greedy(ckpt: str) -> None:
    model = efficia.load(ckpt)
    assert model.generate("ROMEO:", max_new_tokens=8, top_p=0.0, seed=1) == \
        model.generate("ROMEO:", max_new_tokens=8, temperature=0)


def test_sample_refuses_bad_inputs_in_one_line(ckpt: str, tmp_path: Path) -> None:
    junk = tmp_path / "random.ckpt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    cases = [([], "no checkpoint given: python sample.py ckpt="),
             ([f"ckpt={tmp_path / 'missing.ckpt'}"], "missing.ckpt does not exist"),
             ([f"ckpt={junk}"], "is not a readable checkpoint"),
             ([f"ckpt={ckpt}", "num_samples=0"], "num_samples=0"),
             ([f"ckpt={ckpt}", "top_p=1.5"], "top_p=1.5"),
             ([f"ckpt={ckpt}", "device=tpu"], "device='tpu'")]
    if not torch.cuda.is_available():
        cases.append(([f"ckpt={ckpt}", "device=cuda"], "device=cuda but this machine has 0 CUDA device"))
    for overrides, message in cases:
        with pytest.raises(EfficiaError, match=message) as info:
            sample(compose_run(overrides, tmp_path / "s", config_name="sample"))
        assert "\n" not in str(info.value), overrides


def test_an_export_of_a_checkpoint_missing_a_tensor_names_it(ckpt: str, tmp_path: Path, capsys) -> None:
    """torch puts the missing key on the line after "Error(s) in loading state_dict": the one line keeps it."""
    from efficia.inference.export import main as export_main

    state = torch.load(ckpt, weights_only=True)
    del state["state_dict"]["net.tok_emb.weight"]
    torch.save(state, tmp_path / "broken.ckpt")
    with pytest.raises(SystemExit):
        export_main([f"ckpt={tmp_path / 'broken.ckpt'}", f"out={tmp_path / 'out'}"])
    (line,) = capsys.readouterr().err.splitlines()
    assert 'Missing key(s) in state_dict: "tok_emb.weight"' in line and not (tmp_path / "out").exists()


def test_an_ids_prompt_names_the_id_out_of_range(make_cfg) -> None:
    """An MQAR model's prompt "3 -5": the line names -5, not the largest id."""
    from efficia.build import build_model
    from efficia.data.tokenizers import IdTokenizer
    from efficia.inference.loading import LoadedModel

    cfg = OmegaConf.to_container(make_cfg("experiment=recall", "scale=tiny", "data.vocab_size=64"), resolve=True)
    model = LoadedModel(build_model(cfg["model"], 64).eval(), IdTokenizer(64), cfg)
    for prompt, bad in (("3 -5", -5), ("70 3", 70), ("3 64 1", 64)):
        with pytest.raises(EfficiaError, match=rf"token ids must lie in \[0, 64\); got {bad}$"):
            model.generate(prompt, max_new_tokens=1)


# -- train.py: the inputs the issue names, then a seeded fuzz over groups and bad values --------------

FAST = ["debug=fast_dev_run", "logger=csv", "callbacks.progress_bar=null"]

NAMED = {  # override -> the start of the line it must give
    "model.dropout=1.5": "model=gpt: dropout must be in [0, 1), got 1.5",
    "seed=abc": "seed='abc': give a whole number",
    "trainer.val_check_interval=0": "trainer.val_check_interval=0: give whole optimizer steps >= 1",
    "data.batch_size=0": "data.batch_size=0: give a whole number >= 1",
    "data.num_workers=-1": "data.num_workers=-1: give a whole number >= 0",
    "data.val_fraction=1.5": "data.val_fraction=1.5: give the held-out share strictly between 0 and 1",
    "data.seq_len=1000": "data.seq_len=1000 is longer than model.max_seq_len=32",
    "optimizer.lr=-1": "optimizer: Learning rate should be >= 0 but is: -1",  # torch.optim.Muon's own words
    "optimizer=adamw optimizer.lr=-1": "optimizer: Invalid learning rate: -1",
    "optimizer=muon optimizer.muon.lr=-1": "optimizer: Learning rate should be >= 0 but is: -1",
    "sampling.top_p=1.5": "sampling.top_p=1.5: give a number in [0, 1]",
    "callbacks.checkpoint.monitor=nope": "callbacks.checkpoint.monitor='nope' is not a metric this run logs",
    "nonfinite_loss=maybe": "nonfinite_loss='maybe': use one of stop, skip",
    "data=mqar tokenizer=char": "data=mqar generates token ids: use tokenizer=ids (got tokenizer.kind='char')",
    "trainer=rtx3060 callbacks.gpu_budget.headroom=1.5": "callbacks.gpu_budget.headroom=1.5: give the share of the",
}


@pytest.mark.parametrize("override", sorted(NAMED))
def test_named_bad_train_inputs_are_one_line(make_cfg, override: str) -> None:
    require_data()
    with pytest.raises(EfficiaError) as info:
        train(make_cfg(*FAST, *override.split()))
    assert str(info.value).startswith(NAMED[override]) and "\n" not in str(info.value)


def test_binary_file_as_data_path_is_one_line(make_cfg, tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(EfficiaError, match=r"weights.bin is not UTF-8 text .*point data.path at a plain-text"):
        train(make_cfg(*FAST, f"data.path={binary}"))


GROUPS = {"model": ["gpt", "yinggem"], "optimizer": ["adamw", "adafactor"], "trainer": ["cpu", "default", "rtx3060"],
          "tokenizer": ["char", "char", "gpt2"]}
BAD_VALUES = [
    "model.dropout=1.5", "model.dropout=-0.1", "model.n_head=0", "model.pos_emb=foo", "model.max_seq_len=0",
    "seed=abc", "seed=-3", "seed=1.5", "nonfinite_loss=explode",
    "data.batch_size=0", "data.batch_size=-4", "data.batch_size=2.5", "data.batch_size=100000000",
    "data.val_batch_size=0", "data.num_workers=-1", "data.val_fraction=0", "data.val_fraction=1",
    "data.seq_len=0", "data.seq_len=4096", "data.cache_dir=/proc/nope",
    "optimizer.lr=-1", "optimizer.lr=abc", "optimizer.weight_decay=-1",
    "scheduler.warmup_steps=-1", "scheduler.warmup_steps=abc", "scheduler.min_lr_ratio=1.5",
    "trainer.val_check_interval=0", "trainer.val_check_interval=-5", "trainer.val_check_interval=abc",
    "trainer.max_steps=0", "trainer.max_steps=-7", "trainer.precision=abc", "trainer.devices=0",
    "trainer.strategy=nope", "trainer.gradient_clip_val=-1", "trainer.accumulate_grad_batches=0",
    "trainer.log_every_n_steps=0", "trainer.limit_val_batches=-1", "trainer.max_epochs=-5",
    "callbacks.checkpoint.every_n_steps=0", "callbacks.checkpoint.every_minutes=-1",
    "callbacks.checkpoint.save_top_k=-5", "callbacks.checkpoint.monitor=val/nope",
    "callbacks.early_stopping.mode=sideways", "callbacks.early_stopping.monitor=nope",
    "logger.csv.save_dir=/proc/nope", "callbacks.loss_curve.filename=/proc/nope/x.png",
    "sampling.top_p=-0.5", "sampling.top_k=-1", "sampling.temperature=-1", "sampling.max_new_tokens=-1",
    "sampling.repetition_penalty=0", "tokenizer.kind=morse", "model.name=nope",
    "ckpt_path=/nonexistent.ckpt", "ckpt_path=last", "data.path=/nonexistent/input.txt",
]


def fuzz_cases(n: int, seed: int = 14) -> list[list[str]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        groups = [f"{g}={rng.choice(opts)}" for g, opts in GROUPS.items() if rng.random() < 0.5]
        cases.append(groups + rng.sample(BAD_VALUES, rng.choice([0, 1, 1, 2])))
    return cases


def test_config_fuzz_is_success_or_one_clear_line(tmp_path: Path) -> None:
    """A seeded sample of group choices and bad values: each run succeeds or raises one clear line."""
    require_data()
    outcomes = []
    for i, overrides in enumerate(fuzz_cases(10)):
        try:
            cfg = compose_run([*FAST, *overrides], tmp_path / f"run{i}")
        except (HydraException, OmegaConfBaseException) as err:  # Hydra's own one-line CLI message
            outcomes.append((overrides, f"hydra: {str(err).splitlines()[0]}"))
            continue
        try:
            train(cfg)
            outcomes.append((overrides, "ok"))
        except EfficiaError as err:
            assert "\n" not in str(err) and len(str(err)) < 400, (overrides, str(err))
            outcomes.append((overrides, str(err)))
        except BaseException as err:  # noqa: BLE001
            pytest.fail(f"{overrides}: {type(err).__name__}: {err}")
    assert sum(o == "ok" for _, o in outcomes) >= 2 and sum(o != "ok" for _, o in outcomes) >= 5, outcomes

