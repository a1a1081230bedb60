"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023, arXiv 2312.04927), generated in memory.

One example of seq_len tokens, P key/value pairs, vocabulary V (keys from [1, V/2), values from [V/2, V)):

    k1 v1 k2 v2 ... kP vP | f f k2 f f f k1 f ... f kP f f      x (inputs; f = a random filler token)
    -  -  -  -  ... -  -  | - - v2 - - - v1 - ... - vP - -      y (targets; - = -100, ignored)

Every key is asked once, in a random order, at an even offset of the query region; the target of that
position is the key's value, so each answer is determined by the pairs before it. Every other target is
IGNORE (-100), and loss and accuracy count answer positions only. `offsets`: `uniform` (the default) draws the
query slots uniformly, so the key-query distance spans the whole sequence, which is what a window, a memory or
a compressed block has to bridge; `power_law` draws them as Zoology's generator does (slot g with probability
proportional to (g + 1)^(a - 1), a = 0.01, without repeats), which favours queries right after the pairs, so
numbers can be set beside Zoology's.

Train and test examples are disjoint by construction: an example belongs to the test split iff a hash of
its key/value pairs falls in bucket 0 of TEST_BUCKETS; training examples are drawn from the other buckets.
So even an endless training stream (data.num_train=null: fresh examples every step) never shows a test
example. Every batch is a function of (seed, block index): reproducible, and resumable by a step count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from efficia.data.base import IGNORE, DataModule
from efficia.data.resumable import ResumableSampler, training_position
from efficia.data.tokenizers import IdTokenizer, Tokenizer, build_tokenizer
from efficia.errors import DataError

TEST_BUCKETS = 16     # one hash bucket of 16 is the test split
HASH_MOD = 1_000_003  # a prime; the pair hash is a weighted sum of the pair tokens modulo this
TEST_STREAM = 1 << 20  # test blocks are drawn from another part of the (seed, block) space than training ones
OFFSETS = ("uniform", "power_law")
ZOOLOGY_POWER_A = 0.01  # Zoology's train_power_a and test_power_a


def check_setting(seq_len: int, num_kv_pairs: int, vocab_size: int, what: str = "data") -> None:
    """One line per impossible setting: the pairs and their queries must fit, and there must be P distinct keys."""
    for name, value in (("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{what}.{name}={value!r}: give a whole number >= 1")
    if 4 * num_kv_pairs > seq_len:
        raise DataError(f"{what}: {num_kv_pairs} key/value pairs need seq_len >= {4 * num_kv_pairs} (2 tokens per "
                        f"pair, then room for {num_kv_pairs} queries), got seq_len={seq_len}; lower num_kv_pairs "
                        "or raise seq_len")
    if vocab_size // 2 - 1 < num_kv_pairs * 2:  # rows with a repeated key are drawn again: keep repeats rare
        raise DataError(f"{what}: vocab_size={vocab_size} gives {vocab_size // 2 - 1} key tokens, too few for "
                        f"{num_kv_pairs} distinct keys drawn at random (need at least {2 * num_kv_pairs}); "
                        "raise data.vocab_size")


def pair_hash(kv: Tensor) -> Tensor:
    """[N, 2P] pair tokens -> [N] bucket in [0, TEST_BUCKETS): a fixed function of the pairs alone."""
    weights = torch.randint(1, HASH_MOD, (kv.shape[1],), generator=torch.Generator().manual_seed(0))
    return (kv * weights).sum(-1) % HASH_MOD % TEST_BUCKETS


def distinct(g: torch.Generator, n: int, low: int, high: int, k: int) -> Tensor:
    """[n, k] integers from [low, high), distinct within each row, in random order."""
    if k * k > high - low:  # repeats would be common: the first k of a random order of the whole range
        return torch.rand(n, high - low, generator=g).argsort(1)[:, :k] + low
    out = torch.randint(low, high, (n, k), generator=g)
    while True:  # rows with a repeat (rare here) are drawn again
        ordered = out.sort(1).values
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(1)
        if not repeats.any():
            return out
        out[repeats] = torch.randint(low, high, (int(repeats.sum()), k), generator=g)


def pairs(g: torch.Generator, n: int, num_kv_pairs: int, vocab_size: int) -> Tensor:
    """[n, 2P] key/value pairs k1 v1 k2 v2 ...: P distinct keys from [1, V/2), P distinct values from [V/2, V)."""
    half = vocab_size // 2
    kv = torch.empty(n, 2 * num_kv_pairs, dtype=torch.long)
    kv[:, 0::2] = distinct(g, n, 1, half, num_kv_pairs)
    kv[:, 1::2] = distinct(g, n, half, vocab_size, num_kv_pairs)
    return kv


def query_slots(g: torch.Generator, n: int, slots: int, k: int, offsets: str) -> Tensor:
    """[n, k] distinct query slots from [0, slots): uniform, or Zoology's power law in the slot index."""
    if offsets == "uniform":
        return distinct(g, n, 0, slots, k)
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (ZOOLOGY_POWER_A - 1)
    return torch.multinomial(weights.expand(n, slots), k, replacement=False, generator=g)


def examples(g: torch.Generator, kv: Tensor, seq_len: int, vocab_size: int,
             offsets: str = "uniform") -> tuple[Tensor, Tensor]:
    """The pairs, then random fillers with every key asked once at an even offset: (x, y), [n, seq_len]."""
    n, P = kv.shape[0], kv.shape[1] // 2
    keys, values = kv[:, 0::2], kv[:, 1::2]                                         # [n, P]
    x = torch.randint(vocab_size, (n, seq_len), generator=g)                        # fillers everywhere first
    y = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    x[:, :2 * P] = kv
    where = query_slots(g, n, (seq_len - 2 * P) // 2, P, offsets) * 2 + 2 * P      # [n, P] query positions
    x.scatter_(1, where, keys)                                                      # key i is asked at where[:, i]
    y.scatter_(1, where, values)                                                    # ... and its value is the target
    return x, y


def split_batch(seed: int, block: int, n: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
                test: bool, offsets: str = "uniform") -> tuple[Tensor, Tensor]:
    """Block `block` of a split: n examples from the generator seeded (seed, block), only from that split's buckets."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + block)
    kept, have = [], 0
    while have < n:  # about 1/16 (test) or 15/16 (train) of the drawn pairs qualify; draw until there are n
        kv = pairs(g, (n - have) * TEST_BUCKETS + 8 if test else (n - have) * 9 // 8 + 8, num_kv_pairs, vocab_size)
        kv = kv[(pair_hash(kv) == 0) == test]
        kept.append(kv)
        have += len(kv)
    return examples(g, torch.cat(kept)[:n], seq_len, vocab_size, offsets)


def make_split(seed: int, n: int, seq_len: int, num_kv_pairs: int, vocab_size: int, test: bool,
               offsets: str = "uniform", block_size: int = 1024) -> tuple[Tensor, Tensor]:
    """A fixed set of n examples, made of whole blocks of block_size: a larger n only adds examples."""
    base = TEST_STREAM if test else 0
    parts = [split_batch(seed, base + b, block_size, seq_len, num_kv_pairs, vocab_size, test, offsets)
             for b in range(math.ceil(n / block_size))]
    return torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n]


class FreshBatches(IterableDataset):
    """Training batches generated on the fly: batch i of rank r is block (i * world + r) of the seeded stream.
    Endless; `start` is the number of batches this rank already trained (resume)."""

    def __init__(self, seed: int, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
                 rank: int, world_size: int, start: int, offsets: str = "uniform") -> None:
        self.args = (seq_len, num_kv_pairs, vocab_size)
        self.offsets = offsets
        self.seed, self.batch_size, self.rank, self.world_size, self.start = seed, batch_size, rank, world_size, start

    def __iter__(self):
        i = self.start
        while True:
            yield split_batch(self.seed, i * self.world_size + self.rank, self.batch_size, *self.args, test=False,
                              offsets=self.offsets)
            i += 1


class MQARDataModule(DataModule):
    """Train on (seq_len, num_kv_pairs); validate on every `test` setting, one loader each, named `<T>x<P>`."""

    def __init__(self, *, tokenizer: dict[str, Any], seq_len: int, num_kv_pairs: int, vocab_size: int,
                 num_train: int | None, num_test: int, test: list[list[int]] | None, batch_size: int,
                 val_batch_size: int, seed: int, offsets: str) -> None:
        super().__init__()
        check_setting(seq_len, num_kv_pairs, vocab_size)
        if offsets not in OFFSETS:
            raise DataError(f"data.offsets={offsets!r}: give {' or '.join(OFFSETS)}")
        self.offsets = offsets
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size), ("num_test", num_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"data.{name}={value!r}: give a whole number >= 1")
        if num_train is not None and (isinstance(num_train, bool) or not isinstance(num_train, int)
                                      or num_train < batch_size):
            raise DataError(f"data.num_train={num_train!r}: give a whole number >= data.batch_size ({batch_size}), "
                            "or null for fresh examples every step")
        settings = [tuple(s) for s in (test or [[seq_len, num_kv_pairs]])]
        for s in settings:
            if len(s) != 2:
                raise DataError(f"data.test={test!r}: give a list of [seq_len, num_kv_pairs] pairs")
            check_setting(*s, vocab_size, what=f"data.test {list(s)}")
        if len(set(settings)) != len(settings):
            raise DataError(f"data.test={test!r} repeats a setting; list each [seq_len, num_kv_pairs] once")
        self.tokenizer_cfg = dict(tokenizer)
        self.seq_len, self.num_kv_pairs, self.vocab_size = seq_len, num_kv_pairs, vocab_size
        self.num_train, self.num_test, self.settings = num_train, num_test, settings
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed
        self.tokenizer: Tokenizer | None = None
        self.train_set: tuple[Tensor, Tensor] | None = None
        self.test_sets: list[tuple[Tensor, Tensor]] | None = None
        self.resume_batches = 0                 # fresh stream: batches already trained (resume)
        self.resume_fixed: dict[str, Any] = {}  # fixed set: the permutation and position (resume)
        self.sampler = None

    def prepare(self) -> None:
        if self.test_sets is not None:
            return
        if self.tokenizer_cfg.get("kind") != IdTokenizer.kind:  # a text tokenizer would fail on its own terms
            raise DataError(f"data=mqar generates token ids: use tokenizer=ids (got tokenizer.kind="
                            f"{self.tokenizer_cfg.get('kind')!r})")
        self.tokenizer = build_tokenizer(self.tokenizer_cfg, vocab_size=self.vocab_size)
        if self.num_train is not None:
            self.train_set = make_split(self.seed, self.num_train, self.seq_len, self.num_kv_pairs,
                                        self.vocab_size, test=False, offsets=self.offsets)
        self.test_sets = [make_split(self.seed, self.num_test, T, P, self.vocab_size, test=True, offsets=self.offsets)
                          for T, P in self.settings]

    @property
    def val_names(self) -> list[str]:
        return [f"{T}x{P}" for T, P in self.settings]

    @property
    def longest(self) -> int:
        return max([self.seq_len, *(T for T, _ in self.settings)])

    def describe(self) -> str:
        train = (f"{self.num_train:,} fixed" if self.num_train is not None else "fresh every step")
        return (f"MQAR seq_len {self.seq_len}, {self.num_kv_pairs} pairs, {self.offsets} query offsets, "
                f"training examples {train}; "
                f"{self.num_test:,} test examples at each of {', '.join(self.val_names)} (seq_len x pairs)")

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        start, self.resume_batches = self.resume_batches, 0
        if self.num_train is None:
            stream = FreshBatches(self.seed, self.batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size,
                                  rank, world, start, self.offsets)
            return DataLoader(stream, batch_size=None)
        data = TensorDataset(*self.train_set)
        sampler = self.sampler = ResumableSampler(data, num_replicas=world, rank=rank, seed=self.seed)
        if self.resume_fixed:
            sampler.resume_at(self.resume_fixed["permutation"], self.resume_fixed["batches"] * self.batch_size)
            self.resume_fixed = {}
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(TensorDataset(x, y), batch_size=self.val_batch_size, shuffle=False)
                for x, y in self.test_sets]

    # -- resume: the stream is a function of the batch count; a fixed set resumes its permutation --------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        if self.num_train is None:
            return {"batches": trainer.fit_loop.epoch_loop.batch_progress.total.processed}
        return training_position(trainer, self.sampler)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.num_train is None:
            self.resume_batches = int(state_dict.get("batches", 0))
        elif state_dict:
            self.resume_fixed = dict(state_dict)
