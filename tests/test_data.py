"""Tokenizers and the Shakespeare DataModule: real files, real tiktoken, clear errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from efficia.data.shakespeare import ShakespeareDataModule
from efficia.data.tokenizers import CharTokenizer, TiktokenTokenizer, build_tokenizer, tokenizer_from_state
from efficia.errors import DataError, TokenizerError
from tests.conftest import require_data

SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def datamodule(tmp_path: Path, **overrides) -> ShakespeareDataModule:
    kwargs = dict(tokenizer={"kind": "char"}, path=None, url="http://127.0.0.1:9/input.txt", sha256=SHA,
                  filename="input.txt", cache_dir=str(tmp_path / "cache"), seq_len=64, batch_size=4,
                  val_batch_size=8, val_fraction=0.1, num_workers=0, seed=0)
    kwargs.update(overrides)
    return ShakespeareDataModule(**kwargs)


# -- tokenizers -------------------------------------------------------------------------------

def test_char_tokenizer_round_trips_and_rebuilds_from_state() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8
    ids = tok.encode("low red")
    assert tok.decode(ids) == "low red"
    again = tokenizer_from_state(tok.state())
    assert again.encode("low red") == ids


def test_char_tokenizer_names_unknown_characters() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"2 character\(s\) outside .*'d', 'é'"):
        tok.encode("abdé")


def test_gpt2_tiktoken_works_offline_from_the_cache() -> None:
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR not set")
    tok = build_tokenizer({"kind": "tiktoken", "encoding": "gpt2"})
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    lengths = tok.token_byte_lengths()
    assert lengths[15496] == 5 and lengths[995] == 6  # "Hello", " world"


def test_tiktoken_without_network_or_cache_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import tiktoken.load

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by other tests
    with pytest.raises(TokenizerError, match="could not load the tiktoken encoding 'r50k_base'.*TIKTOKEN_CACHE_DIR"):
        TiktokenTokenizer("r50k_base", cache_dir=str(tmp_path / "empty"))


# -- data -------------------------------------------------------------------------------------

def test_split_windows_and_token_cache(tmp_path: Path) -> None:
    require_data()
    dm = datamodule(tmp_path)
    dm.setup("fit")
    assert dm.tokenizer.vocab_size == 65
    assert len(dm.train_tokens) + len(dm.val_tokens) == 1_115_394
    assert len(dm.val_tokens) == 1_115_394 - int(1_115_394 * 0.9)
    cached = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert [p.name.endswith(".uint16.bin") for p in cached] == [True, True]

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])

    val = dm.val_dataloader()
    assert len(val.dataset) == (len(dm.val_tokens) - 1) // 64
    xs = torch.cat([b[0] for b in val])
    assert torch.equal(xs.flatten(), dm.val_tokens[:xs.numel()]), "val windows tile the split in order"
    again = torch.cat([b[0] for b in dm.val_dataloader()])
    assert torch.equal(xs, again), "validation is deterministic"

    inodes = {p: p.stat().st_ino for p in cached}
    dm2 = datamodule(tmp_path)
    dm2.prepare()
    assert {p: p.stat().st_ino for p in cached} == inodes, "a second run reads the cache, never rewrites it"
    assert torch.equal(dm2.val_tokens, dm.val_tokens)
    for p in cached:  # the cache holds exactly the encoded ids
        assert p.stat().st_size == 2 * (len(dm.train_tokens) if "train" in p.name else len(dm.val_tokens))


def test_training_windows_are_random_per_epoch_and_reproducible(tmp_path: Path) -> None:
    """A seeded shuffle: random windows, a new order each epoch, the same order for the same seed."""
    require_data()
    dm = datamodule(tmp_path)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = list(loader.sampler)[:48]
    assert first != sorted(first)
    loader.sampler.set_epoch(1)
    assert list(loader.sampler)[:48] != first
    again = datamodule(tmp_path)
    again.setup("fit")
    assert list(again.train_dataloader().sampler)[:48] == first
    other = datamodule(tmp_path, seed=1)
    other.setup("fit")
    assert list(other.train_dataloader().sampler)[:48] != first
    x, _ = next(iter(loader))
    assert x.shape == (4, 64)


def test_gpt2_tokens_match_the_published_split(tmp_path: Path) -> None:
    require_data()
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR not set")
    dm = datamodule(tmp_path, tokenizer={"kind": "tiktoken", "encoding": "gpt2"})
    dm.prepare()
    assert (len(dm.train_tokens), len(dm.val_tokens)) == (301_966, 36_059)


def test_no_data_names_both_ways_to_provide_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("EFFICIA_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"cannot download tiny Shakespeare.*data\.path=.*EFFICIA_DATA_DIR"):
        datamodule(tmp_path).prepare()


def test_wrong_data_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.path=.*does not exist"):
        datamodule(tmp_path, path=str(tmp_path / "missing.txt")).prepare()


def test_download_is_verified_by_sha256(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("EFFICIA_DATA_DIR", raising=False)
    source = tmp_path / "remote.txt"
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    url = source.as_uri()
    with pytest.raises(DataError, match="sha256 .* expected"):
        datamodule(tmp_path, url=url).prepare()
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists(), "a bad download is not kept"

    good = hashlib.sha256(source.read_bytes()).hexdigest()
    dm = datamodule(tmp_path, url=url, sha256=good, seq_len=16)
    dm.prepare()
    assert (tmp_path / "cache" / "tinyshakespeare" / "input.txt").read_bytes() == source.read_bytes()
    assert dm.tokenizer.decode(dm.train_tokens[:14].tolist()) == "First Citizen:"


def test_data_path_may_be_a_file_or_its_folder(tmp_path: Path) -> None:
    text = tmp_path / "corpus" / "input.txt"
    text.parent.mkdir()
    text.write_text("to be or not to be, that is the question " * 40)
    for path in (text, text.parent):
        dm = datamodule(tmp_path, path=str(path), seq_len=8)
        dm.prepare()
        assert dm.tokenizer.decode(dm.train_tokens[:5].tolist()) == "to be"
