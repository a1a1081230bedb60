"""Tiny Shakespeare: download (checked by sha256) or a local path, encode once, 90/10 split.

Training draws random windows; validation walks fixed non-overlapping windows of the held-out
text, so a validation loss means the same thing in every run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from efficia.data.base import DataModule
from efficia.data.resumable import ResumableSampler, training_position
from efficia.data.tokenizers import Tokenizer, build_tokenizer
from efficia.errors import DataError

DATA_ENV = "EFFICIA_DATA_DIR"


class RandomWindows(Dataset):
    """Every start offset is one item; a shuffled loader therefore yields random windows."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if len(tokens) <= seq_len:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i:i + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class FixedWindows(Dataset):
    """Non-overlapping windows covering the split; the remainder shorter than a window is dropped."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if len(tokens) <= seq_len:
            raise DataError(f"the validation split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        chunk = self.tokens[start:start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash (or a second process) never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShakespeareDataModule(DataModule):
    def __init__(self, *, tokenizer: dict[str, Any], path: str | None, url: str, sha256: str, filename: str,
                 cache_dir: str, seq_len: int, batch_size: int, val_batch_size: int, val_fraction: float,
                 num_workers: int, seed: int) -> None:
        super().__init__()
        check_positive_int("data.seq_len", seq_len)
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.val_batch_size", val_batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"data.num_workers={num_workers!r}: give a whole number >= 0 (0 loads in the main process)")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction!r}: give the held-out share strictly between 0 and 1, "
                            "e.g. 0.1")
        self.seed = seed
        self.resume: dict[str, Any] = {}
        self.train_sampler: ResumableSampler | None = None
        self.tokenizer_cfg = dict(tokenizer)
        self.path, self.url, self.sha256, self.filename = path, url, sha256, filename
        self.cache_dir = Path(cache_dir).expanduser()
        self.seq_len, self.batch_size, self.val_batch_size = seq_len, batch_size, val_batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None

    # -- locating the text -------------------------------------------------------------------
    def resolve_text_file(self) -> Path:
        """data.path, then $EFFICIA_DATA_DIR, then the cached download, then a fresh download."""
        if self.path:
            candidate = Path(self.path).expanduser()
            if candidate.is_dir():
                candidate = candidate / self.filename
            if not candidate.is_file():
                raise DataError(f"data.path={self.path} does not exist (expected tiny Shakespeare's "
                                f"{self.filename}); fix the path or drop it to download")
            return candidate
        env_dir = os.environ.get(DATA_ENV)
        if env_dir:
            for candidate in (Path(env_dir) / "tinyshakespeare" / self.filename, Path(env_dir) / self.filename):
                if candidate.is_file():
                    return candidate
        cached = self.cache_dir / "tinyshakespeare" / self.filename
        if cached.is_file() and sha256_of(cached) == self.sha256:
            return cached
        return self.download(cached, env_dir)

    def download(self, target: Path, env_dir: str | None) -> Path:
        try:
            with urllib.request.urlopen(self.url, timeout=20) as response:
                data = response.read()
        except OSError as err:
            hint = f"{DATA_ENV}={env_dir} has no tinyshakespeare/{self.filename}" if env_dir else f"{DATA_ENV} is unset"
            raise DataError(
                f"cannot download tiny Shakespeare from {self.url} ({err}); {hint}. Offline, pass "
                f"data.path=/path/to/{self.filename} or set {DATA_ENV} to a folder holding "
                f"tinyshakespeare/{self.filename}"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise DataError(f"downloaded tiny Shakespeare has sha256 {digest}, expected {self.sha256}; "
                            "the file at the URL changed or the download was corrupted")
        atomic_write_bytes(target, data)
        return target

    # -- encoding, once -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read, build the tokenizer, encode (cached on disk) and split. Idempotent."""
        if self.train_tokens is not None:
            return
        text_file = self.resolve_text_file()
        try:
            text = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{text_file} is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "point data.path at a plain-text corpus") from None
        if not text:
            raise DataError(f"{text_file} is empty: point data.path at a plain-text corpus")
        self.tokenizer = build_tokenizer(self.tokenizer_cfg, corpus=text)
        split_at = int(len(text) * (1 - self.val_fraction))
        # the key names everything that changes the tokens: the text, the tokenizer and where the split falls
        key = f"{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}-{self.tokenizer.name}-split{split_at}"
        self.train_tokens = self.encode_cached(text[:split_at], f"{key}-train")
        self.val_tokens = self.encode_cached(text[split_at:], f"{key}-val")
        self.check_windows()

    def check_windows(self) -> None:
        """Refuse a window longer than a split now, before anything runs a model at that length (Lightning's
        model summary runs one forward over a whole window: minutes and gigabytes at a length of millions)."""
        for split, tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) <= self.seq_len:
                raise DataError(f"the {split} split holds {len(tokens):,} tokens, fewer than one window of "
                                f"data.seq_len={self.seq_len} (+1 target); lower data.seq_len (it follows "
                                "model.max_seq_len) or use more text")
        if len(self.train_tokens) - self.seq_len < self.batch_size:
            raise DataError(f"the training split has {len(self.train_tokens) - self.seq_len:,} windows of "
                            f"seq_len={self.seq_len}, fewer than one batch (data.batch_size={self.batch_size}); "
                            "lower data.batch_size or seq_len, or use more text")

    def encode_cached(self, text: str, key: str) -> torch.Tensor:
        dtype = np.uint16 if self.tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        cache_file = self.cache_dir / "tokens" / f"{key}.{np.dtype(dtype).name}.bin"
        if cache_file.is_file():
            ids = np.fromfile(cache_file, dtype=dtype)
        else:
            ids = np.asarray(self.tokenizer.encode(text), dtype=dtype)
            try:
                atomic_write_bytes(cache_file, ids.tobytes())
            except OSError as err:
                raise DataError(f"cannot write the token cache {cache_file} ({err.strerror}); point data.cache_dir "
                                "(or EFFICIA_CACHE_DIR) at a writable folder") from None
        return torch.from_numpy(ids.astype(np.int64))

    def describe(self) -> str:
        return f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens"

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.train_tokens, self.seq_len)
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(windows) // replicas < self.batch_size:
            raise DataError(f"the training split has {len(windows):,} windows of seq_len={self.seq_len}, fewer than "
                            f"one batch (data.batch_size={self.batch_size} x {replicas} process(es)); lower "
                            "data.batch_size or seq_len, or use more text")
        sampler = self.train_sampler = ResumableSampler(windows, num_replicas=replicas, rank=rank, seed=self.seed)
        if self.resume:
            sampler.resume_at(self.resume["permutation"], self.resume["batches"] * self.batch_size)
            self.resume = {}
        # an explicit generator: creating loader iterators (validation too) never draws from the global RNG
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(FixedWindows(self.val_tokens, self.seq_len), batch_size=self.val_batch_size,
                          shuffle=False, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    # -- exact resume: where in the shuffled order the last checkpoint was written -------------
    def state_dict(self) -> dict[str, Any]:
        return training_position(self.trainer, self.train_sampler)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume = dict(state_dict)


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name}={value!r}: give a whole number >= 1")
