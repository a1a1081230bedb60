"""data=wikipedia: real `datasets` streaming of the local sample, real tiktoken, real Lightning Trainer."""

from __future__ import annotations

import glob
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

import efficia
from efficia.config import compose_run
from efficia.data.tokenizers import ByteTokenizer, build_tokenizer, tokenizer_from_state
from efficia.data.wikipedia import WikipediaDataModule
from efficia.errors import DataError, TokenizerError
from efficia.models import MODELS
from efficia.training.run import train

SAMPLE = Path(os.environ["EFFICIA_WIKIPEDIA_FILES"]).parent
PARQUET = str(SAMPLE / "*.parquet")


@pytest.fixture(scope="module")
def sample_docs() -> dict[str, str]:
    """id -> text of the whole sample, read without `datasets` (the reference the stream is checked against)."""
    if not SAMPLE.is_dir():
        pytest.fail(f"the Wikipedia sample is missing: {SAMPLE} (set EFFICIA_WIKIPEDIA_FILES or EFFICIA_DATA_DIR)")
    rows = [json.loads(line) for line in (SAMPLE / "sample.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["id"]: r["text"] for r in rows}


def datamodule(make_cfg, *overrides: str) -> WikipediaDataModule:
    cfg = make_cfg("data=wikipedia", "scale=tiny", *overrides)
    dm = instantiate(cfg.data, tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    dm.prepare()
    return dm


# -- tokenizer, held-out set, packing ---------------------------------------------------------------

def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = build_tokenizer({"kind": "byte"})
    text = "Zürich — 東京 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256 and tok.vocab_size == 257
    assert tok.decode([*ids, tok.eot]) == text and tokenizer_from_state(tok.state()).encode(text) == ids
    assert tok.token_byte_lengths()[ids].sum() == len(ids) and tok.token_byte_lengths()[tok.eot] == 0


def test_held_out_set_is_fixed_and_its_bytes_are_the_texts(make_cfg, sample_docs) -> None:
    dm = datamodule(make_cfg, "data.val_bytes=100000")
    first = list(sample_docs)[:len(dm.val_ids)]
    assert dm.val_ids == set(first), "the held-out documents are the first ones in file order"
    assert sum(len(sample_docs[i].encode()) for i in first[:-1]) < 100_000 <= sum(len(sample_docs[i].encode())
                                                                                   for i in first)
    jsonl = datamodule(make_cfg, "data.val_bytes=100000", f"data.files={SAMPLE / 'sample.jsonl'}")
    assert torch.equal(jsonl.val_tokens, dm.val_tokens), "same documents, same held-out set, whatever the format"
    # bits per byte: end-of-text counts no bytes, so the target bytes are the texts' UTF-8 bytes
    text_bytes = sum(len(sample_docs[i].encode()) for i in first)
    assert dm.tokenizer.name == "gpt2" and dm.val_tokens[-1] == dm.tokenizer.eot
    assert dm.tokenizer.token_byte_lengths()[dm.val_tokens].sum() == text_bytes
    assert ByteTokenizer().token_byte_lengths()[datamodule(make_cfg, "data.val_bytes=100000",
                                                           "tokenizer=byte").val_tokens].sum() == text_bytes


def test_packing_rows_are_whole_documents_with_no_padding(make_cfg, sample_docs) -> None:
    """One pass, one consumer: each row's token stream splits at end-of-text into complete documents."""
    dm = datamodule(make_cfg, "tokenizer=byte", "data.val_bytes=100000", "data.passes=1", "data.batch_size=3",
                    "model.max_seq_len=256")
    batches = list(dm.train_dataloader())
    assert all(x.shape == y.shape == (3, 256) for x, y, _ in batches), "every batch is full: no padding"
    rows = [torch.cat([b[0][r] for b in batches] + [batches[-1][1][r, -1:]]) for r in range(3)]
    for r in range(3):  # targets are the inputs shifted by one, across batch boundaries too
        assert torch.equal(torch.cat([b[1][r] for b in batches]), rows[r][1:])
    seen = []
    for row in rows:
        *docs, _unfinished = bytes(t if t < 256 else 0 for t in row.tolist()).split(bytes([0]))  # 0: end-of-text
        seen += [d.decode("utf-8") for d in docs]
    train_texts = {t for i, t in sample_docs.items() if i not in dm.val_ids}
    assert len(seen) == len(set(seen)) and set(seen) <= train_texts, "complete documents, each at most once"
    assert len(seen) >= len(train_texts) - 3, "at most one unfinished document per row is left at the end"
    assert max(len(t.encode()) for t in seen) > 4 * 256, "long documents continue across batches, untruncated"


# -- sharding: 2 ranks x 2 DataLoader workers ------------------------------------------------------------

class ConsumerIds(IterableDataset):
    """The document ids the training stream of this worker (one rank's PackedStream) reads, tagged."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        slot = self.stream.slot()
        return ((self.stream.rank, slot, doc_id) for doc_id in self.stream.documents(slot))


def test_two_ranks_two_workers_read_disjoint_and_complete_documents(make_cfg, sample_docs) -> None:
    dm = datamodule(make_cfg, "data.num_workers=2", "tokenizer=byte", "data.val_bytes=100000")
    owner: dict[str, tuple[int, int]] = {}
    for rank in range(2):
        loader = DataLoader(ConsumerIds(dm.train_dataset(rank, world_size=2)), batch_size=None, num_workers=2)
        for r, slot, doc_id in loader:
            assert doc_id not in owner, f"document {doc_id} read by {owner[doc_id]} and {(r, slot)}"
            owner[doc_id] = (int(r), int(slot))
    assert set(owner) == set(sample_docs) - dm.val_ids, "together the four consumers read every training document"
    assert set(owner.values()) == {(r, s) for r in range(2) for s in range(2)}


# -- through the real Trainer -------------------------------------------------------------------------

class RecordBatches(Callback):
    """Saves the input ids of every training batch (in step order) to `path` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batches.append(batch[0].clone())

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(torch.stack(self.batches), self.path)


def test_resumed_run_sees_exactly_the_tokens_of_an_uninterrupted_one(tmp_path: Path) -> None:
    common = ["data=wikipedia", "tokenizer=byte", "scale=tiny", "logger=csv", "data.num_workers=2",
              "data.shuffle_buffer=8", "data.val_bytes=50000", "data.batch_size=4", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "callbacks.early_stopping=null",
              "callbacks.loss_curve=null", "+callbacks.record._target_=tests.test_wikipedia.RecordBatches"]

    def run(name: str, *extra: str) -> dict:
        return train(compose_run([*common, f"+callbacks.record.path={tmp_path / name}.pt", *extra], tmp_path / name))

    run("whole", "trainer.max_steps=5")
    first = run("first", "trainer.max_steps=3")
    resumed = run("resumed", "trainer.max_steps=5", f"ckpt_path={first['last_ckpt']}")
    assert resumed["global_step"] == 5
    whole, parts = torch.load(tmp_path / "whole.pt"), [torch.load(tmp_path / f"{n}.pt") for n in ("first", "resumed")]
    assert [len(p) for p in parts] == [3, 2]
    assert torch.equal(torch.cat(parts), whole), "the resumed run neither replays nor skips data"
    assert not torch.equal(whole[3], whole[4])
    text = efficia.load(first["last_ckpt"]).generate("The ", max_new_tokens=8, seed=0)[0]  # byte tokens sample too
    assert text.startswith("The ") and len(text.encode("utf-8", "replace")) >= 4
    saved = torch.load(first["last_ckpt"], weights_only=True)["WikipediaDataModule"]  # loads without pickled code
    other = instantiate(compose_run(common, tmp_path / "other").data, tokenizer={"kind": "byte"}, num_workers=0)
    with pytest.raises(DataError, match="same trainer.devices and data.num_workers"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_trains_and_validates_on_the_stream(make_cfg, model: str) -> None:
    cfg = make_cfg("data=wikipedia", f"model={model}", "tokenizer=gpt2", "scale=tiny", "logger=csv",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                   "trainer.num_sanity_val_steps=0", "data.val_batch_size=4", "data.val_bytes=20000")
    result = train(cfg)
    m = result["metrics"]
    assert result["global_step"] == 2 and math.isfinite(m["train/loss"]) and m["train/tokens"] == 2 * 12 * 32
    assert 0 < m["val/bpb"] < 10 and math.isfinite(m["val/loss"])


# -- errors a person can act on -------------------------------------------------------------------------

def test_the_hub_unreachable_fails_in_seconds_naming_data_files(make_cfg, monkeypatch) -> None:
    cfg = make_cfg("data=wikipedia", "data.files=null")
    tokenizer = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    start = time.perf_counter()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE.*is set; offline, pass data.files="):
        instantiate(cfg.data, tokenizer=tokenizer).prepare()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub at http://127.0.0.1:9 .*data\.files="):
        instantiate(cfg.data, tokenizer=tokenizer).prepare()
    assert time.perf_counter() - start < 10


def test_char_tokenizer_and_missing_files_are_clear_errors(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer=byte .* or tokenizer=gpt2"):
        datamodule(make_cfg, "tokenizer=char")
    with pytest.raises(DataError, match="data.files: .*nothing.parquet matches no file"):
        datamodule(make_cfg, f"data.files={tmp_path}/nothing.parquet")
    assert glob.glob(PARQUET)
    with pytest.raises(DataError, match="holds out every document"):
        datamodule(make_cfg, "data.val_bytes=100000000")
