"""data=mqar: the generator's promises, loss and accuracy on answer positions only, the DataModule contract,
experiment=recall / compare_recall, and the sweep report's recall columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from efficia.data.base import IGNORE
from efficia.data.mqar import FreshBatches, MQARDataModule, make_split, pair_hash, split_batch
from efficia.data.tokenizers import IdTokenizer, build_tokenizer
from efficia.errors import DataError, TokenizerError

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
                       num_test=10, test=None, batch_size=4, val_batch_size=4, seed=0)
    with pytest.raises(DataError, match=r"data.test \[64, 40\]"):
        MQARDataModule(tokenizer={"kind": "ids"}, seq_len=32, num_kv_pairs=4, vocab_size=512, num_train=None,
                       num_test=10, test=[[32, 4], [64, 40]], batch_size=4, val_batch_size=4, seed=0)
    with pytest.raises(DataError, match="too few for 8 distinct keys"):
        MQARDataModule(tokenizer={"kind": "ids"}, seq_len=64, num_kv_pairs=8, vocab_size=40, num_train=None,
                       num_test=10, test=None, batch_size=4, val_batch_size=4, seed=0)


def test_ids_tokenizer_round_trips_and_refuses_text() -> None:
    tok = build_tokenizer({"kind": "ids"}, vocab_size=512)
    assert isinstance(tok, IdTokenizer) and tok.vocab_size == 512 and tok.state() == {"kind": "ids", "vocab_size": 512}
    assert tok.encode(tok.decode([3, 300, 7])) == [3, 300, 7]
    assert tok.token_byte_lengths()[300] == len("300 ")
    with pytest.raises(TokenizerError, match="not whitespace-separated token ids"):
        tok.encode("ROMEO:")
    with pytest.raises(TokenizerError, match="tokenizer=ids is for data that are token ids"):
        build_tokenizer({"kind": "ids"}, corpus="some text")


