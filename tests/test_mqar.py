"""data=mqar: the generator's promises, loss and accuracy on answer positions only, the DataModule contract,
experiment=recall / compare_recall, and the sweep report's recall columns."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from efficia.data.base import IGNORE, DataModule
from efficia.data.mqar import FreshBatches, MQARDataModule, make_split, pair_hash, split_batch
from efficia.data.tokenizers import IdTokenizer, build_tokenizer
from efficia.errors import ConfigError, DataError, TokenizerError
from efficia.inference.sampling_cli import sample
from efficia.models import MODELS
from efficia.training.module import TrainingModule
from efficia.training.run import train
from efficia.training.sweep import RECORD, write_report
from tests.conftest import CONF

TINY = ["experiment=recall", "scale=tiny", "logger=csv", "callbacks.progress_bar=null", "model.max_seq_len=64",
        "data.seq_len=32", "data.num_kv_pairs=4", "data.vocab_size=64", "data.num_test=40",
        "data.test=[[32,4],[64,4],[32,2]]", "data.batch_size=8", "data.val_batch_size=16"]


def answers_from_pairs(x: Tensor, y: Tensor, pairs: int) -> None:
    """Every scored position asks a key of the pairs at the start; its target is that key's value."""
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys)) == pairs  # a key is defined once, so its value is unambiguous
        asked = [t for t, target in enumerate(row_y) if target != IGNORE]
        assert len(asked) == pairs and all(t >= 2 * pairs for t in asked)  # every key asked once, after the pairs
        assert sorted(row_x[t] for t in asked) == sorted(keys)
        for t in asked:
            assert row_y[t] == values[keys.index(row_x[t])]


@pytest.mark.parametrize(("seq_len", "pairs", "vocab"), [(32, 4, 64), (64, 8, 512), (256, 16, 8192)])
def test_each_answer_is_determined_by_the_pairs_before_it(seq_len: int, pairs: int, vocab: int) -> None:
    x, y = make_split(3, 50, seq_len, pairs, vocab, test=True)
    assert x.shape == y.shape == (50, seq_len) and x.min() >= 0 and x.max() < vocab
    answers_from_pairs(x, y, pairs)
    x, y = split_batch(3, 7, 20, seq_len, pairs, vocab, test=False)
    answers_from_pairs(x, y, pairs)


def test_seeds_reproduce_and_differ() -> None:
    a, b = make_split(1, 300, 32, 4, 64, test=False), make_split(1, 300, 32, 4, 64, test=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], make_split(2, 300, 32, 4, 64, test=False)[0])
    # a larger set starts with the smaller one: num_test/num_train only add examples
    assert torch.equal(make_split(1, 1500, 32, 4, 64, test=False)[0][:300], a[0])
    # the fresh stream is a function of (seed, batch index): a resumed stream continues it exactly
    stream = iter(FreshBatches(5, 8, 32, 4, 64, rank=0, world_size=1, start=0))
    first = [next(stream) for _ in range(4)]
    resumed = next(iter(FreshBatches(5, 8, 32, 4, 64, rank=0, world_size=1, start=3)))
    assert torch.equal(resumed[0], first[3][0]) and not torch.equal(first[0][0], first[1][0])
    rank1 = next(iter(FreshBatches(5, 8, 32, 4, 64, rank=1, world_size=2, start=0)))
    assert torch.equal(rank1[0], first[1][0])  # ranks take alternate blocks: no two ranks see the same batch


def test_train_and_test_examples_are_disjoint() -> None:
    """A tiny vocabulary makes the same pairs recur often; the hash split must still keep test examples out of
    training, for a fixed training set and for the fresh stream."""
    T, P, V = 8, 2, 16
    test = {tuple(r) for r in make_split(0, 400, T, P, V, test=True)[0][:, :2 * P].tolist()}
    train_fixed = {tuple(r) for r in make_split(0, 4000, T, P, V, test=False)[0][:, :2 * P].tolist()}
    stream = iter(FreshBatches(0, 100, T, P, V, rank=0, world_size=1, start=0))
    train_stream = {tuple(r) for _ in range(40) for r in next(stream)[0][:, :2 * P].tolist()}
    assert not test & train_fixed and not test & train_stream
    assert len(test) > 20 and len(train_fixed) > 300  # many distinct contexts: not disjoint by emptiness
    contexts = torch.tensor(sorted(test | train_fixed))
    assert ((pair_hash(contexts) == 0) == torch.tensor([c in test for c in map(tuple, contexts.tolist())])).all()


def test_impossible_settings_are_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"8 key/value pairs need seq_len >= 32"):
        MQARDataModule(tokenizer={"kind": "ids"}, seq_len=16, num_kv_pairs=8, vocab_size=512, num_train=None,
                       num_test=10, test=None, batch_size=4, val_batch_size=4, seed=0, offsets="uniform")
    with pytest.raises(DataError, match=r"data.test \[64, 40\]"):
        MQARDataModule(tokenizer={"kind": "ids"}, seq_len=32, num_kv_pairs=4, vocab_size=512, num_train=None,
                       num_test=10, test=[[32, 4], [64, 40]], batch_size=4, val_batch_size=4, seed=0, offsets="uniform")
    with pytest.raises(DataError, match="too few for 8 distinct keys"):
        MQARDataModule(tokenizer={"kind": "ids"}, seq_len=64, num_kv_pairs=8, vocab_size=30, num_train=None,
                       num_test=10, test=None, batch_size=4, val_batch_size=4, seed=0, offsets="uniform")


def test_ids_tokenizer_round_trips_and_refuses_text() -> None:
    tok = build_tokenizer({"kind": "ids"}, vocab_size=512)
    assert isinstance(tok, IdTokenizer) and tok.vocab_size == 512 and tok.state() == {"kind": "ids", "vocab_size": 512}
    assert tok.encode(tok.decode([3, 300, 7])) == [3, 300, 7]
    assert tok.token_byte_lengths()[300] == len("300 ")
    with pytest.raises(TokenizerError, match="not whitespace-separated token ids"):
        tok.encode("ROMEO:")
    with pytest.raises(TokenizerError, match="tokenizer=ids is for data that are token ids"):
        build_tokenizer({"kind": "ids"}, corpus="some text")


# -- loss and accuracy on answer positions only, through the real LightningModule and Trainer ------------------

MARGIN = 2.0  # the oracle's logit for its answer (0 elsewhere): loss per answer log(V - 1 + e^2) - 2


class Oracle(nn.Module):
    """Solves MQAR exactly with a known loss per answer: at each position it looks up the first earlier occurrence
    of the current token and predicts the token after it (a key's first occurrence is its pair). `miss` answers
    every query of each batch's first example wrongly. Its loss and accuracy depend only on which positions
    are counted."""

    def __init__(self, vocab: int, miss: bool = False) -> None:
        super().__init__()
        self.vocab, self.miss = vocab, miss
        self.bias = nn.Parameter(torch.zeros(()))  # the optimizer needs one parameter

    @property
    def head_weight(self) -> Tensor:  # the output unit's contract: logits = hidden @ head_weight.T
        return torch.eye(self.vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(x)

    def hidden(self, x: Tensor) -> Tensor:
        B, T = x.shape
        earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)                                   # [T, T] j < t
        seen = (x[:, :, None] == x[:, None, :]) & earlier                                       # [B, T, T]
        first = seen.int().argmax(-1)                                                           # [B, T]
        answer = torch.where(seen.any(-1), x.gather(1, (first + 1).clamp(max=T - 1)), 0)         # [B, T]
        if self.miss:  # every looked-up position of the batch's first example (all its answers) wrong
            answer[0] = torch.where(seen[0].any(-1), (answer[0] + 1) % self.vocab, answer[0])
        return MARGIN * nn.functional.one_hot(answer, self.vocab).float() + self.bias             # [B, T, V]


def oracle_module(make_cfg, miss: bool = False) -> tuple[TrainingModule, MQARDataModule]:
    cfg = make_cfg(*TINY)
    plain = OmegaConf.to_container(cfg, resolve=True)
    dm = instantiate(cfg.data, tokenizer=plain["tokenizer"])
    dm.prepare()
    module = TrainingModule(plain, dm.tokenizer.state())
    module.net = Oracle(cfg.data.vocab_size, miss)
    return module, dm


def test_loss_and_accuracy_count_answer_positions_only(make_cfg) -> None:
    """The oracle is right on every answer with a known loss: a loss averaged over every position (ignored
    ones cost 0) would be several times smaller, an accuracy over every position far below 1."""
    module, dm = oracle_module(make_cfg)
    per_answer = float(torch.log(torch.tensor(dm.vocab_size - 1 + torch.e ** MARGIN))) - MARGIN
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert metrics["val/recall_acc"] == 1.0
    assert {k: v for k, v in metrics.items() if k.startswith("val/recall_acc/")} == {
        "val/recall_acc/32x4": 1.0, "val/recall_acc/64x4": 1.0, "val/recall_acc/32x2": 1.0}
    assert metrics["val/loss"] == pytest.approx(per_answer, rel=1e-5)
    # bits per byte over the answers' text: every value id in [32, 64) is 2 digits and a space
    assert metrics["val/bpb"] == pytest.approx(per_answer / 3 / torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    fit = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    fit.fit(module, datamodule=dm)
    assert float(fit.callback_metrics["train/loss"]) == pytest.approx(per_answer, rel=1e-4)  # training too

    module, dm = oracle_module(make_cfg, miss=True)  # the first example of every batch answered wrongly
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    batches = -(-dm.num_test // dm.val_batch_size)  # per test set
    for name in ("32x4", "64x4", "32x2"):
        assert metrics[f"val/recall_acc/{name}"] == pytest.approx(1 - batches / dm.num_test, abs=1e-6)
    assert metrics["val/recall_acc"] == pytest.approx(1 - batches / dm.num_test, abs=1e-6)


# -- the DataModule contract and the experiments ---------------------------------------------------------------

def test_every_data_option_is_a_datamodule() -> None:
    for path in sorted((CONF / "data").glob("*.yaml")):
        target = OmegaConf.load(path)._target_
        module, name = target.rsplit(".", 1)
        cls = getattr(__import__(module, fromlist=[name]), name)
        assert issubclass(cls, DataModule), f"conf/data/{path.name}: {target} must subclass DataModule"


class OutsideTheContract(L.LightningDataModule):
    def __init__(self, tokenizer: dict, seq_len: int) -> None:
        super().__init__()


def test_a_datamodule_outside_the_contract_or_too_long_for_the_model_is_refused(make_cfg) -> None:
    cfg = make_cfg(*TINY)
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.OutsideTheContract", "seq_len": 32})
    with pytest.raises(ConfigError, match="not an efficia.data.base.DataModule"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"sequences of 64 tokens .* longer than model.max_seq_len=32"):
        train(make_cfg(*TINY, "model.max_seq_len=32"))


def test_recall_run_logs_accuracy_per_setting_and_its_record(make_cfg) -> None:
    """The user's path: train() on data=mqar writes val/recall_acc (overall and per <T>x<P>) to the CSV log
    and to the run record the sweep report reads."""
    cfg = make_cfg(*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1")
    result = train(cfg)
    assert result["global_step"] == 4 and 0 <= result["metrics"]["val/recall_acc"] <= 1
    header = (Path(cfg.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("val/recall_acc", "val/recall_acc/32x4", "val/recall_acc/64x4", "val/recall_acc/32x2", "val/loss"):
        assert key in header
    record = json.loads((Path(cfg.output_dir) / RECORD).read_text())
    assert [v["step"] for v in record["val"]] == [2, 4]
    assert set(record["val"][-1]["recall"]) == {"32x4", "64x4", "32x2"}
    assert record["final_recall_acc"] == record["val"][-1]["recall_acc"] == result["metrics"]["val/recall_acc"]


def test_the_sample_command_train_prints_works_for_an_ids_run(make_cfg, capsys) -> None:
    """train() ends by printing a sample command; on token ids its prompt must be ids too (a text prompt is refused
    by the ids tokenizer), and the command as printed must run."""
    result = train(make_cfg(*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("sample: python sample.py"))
    prompt = re.search(r'prompt="([^"]*)"', line).group(1)
    assert f"ckpt={result['best_ckpt']}" in line and prompt.split() and all(t.isdigit() for t in prompt.split())
    texts = sample(make_cfg(f"ckpt={result['best_ckpt']}", f"prompt={prompt!r}", "max_new_tokens=3", "seed=0",
                            config_name="sample"))
    assert texts[0].startswith(prompt) and len(texts[0].split()) == len(prompt.split()) + 3


def test_compare_recall_sweeps_every_model_on_one_recipe() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["experiment=compare_recall"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        sweep = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
        swept = {o.get_key_element(): list(o.sweep_string_iterator()) for o in sweep}
        recall = compose("train", overrides=["experiment=recall"])
    assert cfg.hydra.mode.name == "MULTIRUN" and swept["data.seq_len"] == ["64", "256", "128"]
    assert sorted(swept["model"]) == sorted(MODELS)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(recall.data)  # compare_recall = recall's recipe
    assert cfg.callbacks.early_stopping is None and cfg.model.max_seq_len >= max(t for t, _ in cfg.data.test)
    sweeper = cfg.hydra.sweeper  # the comparison protocol, on answer accuracy: higher is better
    assert sweeper._target_.endswith("ComparisonSweeper")
    assert (sweeper.metric, sweeper.mode) == ("val/recall_acc", "max")


def test_sweep_report_has_recall_columns_and_plot(make_cfg, tmp_path: Path) -> None:
    """Two real jobs (different models) under one sweep dir: the report gains the accuracy columns and recall.png."""
    sweep = tmp_path / "sweep"
    for job, model in enumerate(("gpt", "yinggem")):
        overrides = [f"model={model}"]
        cfg = make_cfg(*TINY, *overrides, "trainer.max_steps=2", "trainer.val_check_interval=2")
        cfg.output_dir = str(sweep / str(job))
        train(cfg)
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    write_report(sweep)
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["gpt", "yinggem"]
    settings = ["recall_acc/32x2", "recall_acc/32x4", "recall_acc/64x4"]  # ordered by seq_len, then pairs
    assert [c for c in rows[0] if c.startswith("recall_acc/")] == settings
    for r in rows:
        record = json.loads((sweep / r["job"] / RECORD).read_text())
        assert float(r["final_recall_acc"]) == pytest.approx(record["val"][-1]["recall_acc"])
        for s in settings:
            assert float(r[s]) == pytest.approx(record["val"][-1]["recall"][s.split("/")[1]])
    md = (sweep / "summary.md").read_text()
    assert "## Recall" in md and "| 32x2 | 32x4 | 64x4 |" in md and "| `model=yinggem` |" in md
    assert (sweep / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_test_setting_logs_the_overall_accuracy_only(make_cfg) -> None:
    """data.test=null (the training setting only, as plain data=mqar has): one validation set, no per-set names."""
    result = train(make_cfg(*TINY, "data.test=null", "debug=fast_dev_run"))
    assert 0 <= result["metrics"]["val/recall_acc"] <= 1
    assert not [k for k in result["metrics"] if k.startswith("val/recall_acc/")]


def query_slots_of(y: Tensor, pairs: int) -> Tensor:
    """The query slot (0 = right after the pairs) of every answer position."""
    return ((y != IGNORE).nonzero()[:, 1] - 2 * pairs) // 2


def test_power_law_offsets_follow_zoologys_generator_through_the_config() -> None:
    """data.offsets=power_law: query slots drawn as Zoology's multiquery_ar draws them (numpy's weighted choice
    without repeats, slot g with weight (g + 1)^(a - 1), a = 0.01), checked against that draw itself."""
    import numpy as np

    T, P, n = 128, 8, 2000
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["experiment=recall", f"data.seq_len={T}", f"data.num_kv_pairs={P}",
                                          f"data.num_test={n}", "data.offsets=power_law", "data.test=null"])
    data = instantiate(cfg.data, tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    data.prepare()
    x, y = data.test_sets[0]
    answers_from_pairs(x[:200], y[:200], P)
    ours = query_slots_of(y, P).numpy()
    space = (T - 2 * P) // 2
    p = np.arange(1, space + 1) ** (0.01 - 1)
    rng = np.random.default_rng(0)
    zoology = np.concatenate([rng.choice(space, size=P, replace=False, p=p / p.sum()) for _ in range(n)])
    for k in (1, 4, 16, 32):  # the share of queries within k slots of the pairs
        assert abs((ours < k).mean() - (zoology < k).mean()) < 0.02, k
    uniform = query_slots_of(make_split(0, n, T, P, 8192, test=True)[1], P).numpy()
    assert (uniform < 4).mean() < 0.1 < 0.2 < (ours < 4).mean()  # the default differs: every distance alike
