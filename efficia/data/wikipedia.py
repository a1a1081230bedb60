"""Wikipedia as a stream: Hugging Face `datasets` (streaming=True, no full download) or local files in the
hub schema (id, url, title, text), tokenized on the fly, packed into full sequences, sharded over DDP ranks
and DataLoader workers, resumable from the checkpoint.

Policies, in one place:
- Held-out set: the first documents of the stream in file order until their text reaches `val_bytes` UTF-8
  bytes. Training skips them by id, so they are never trained on; every run and rank sees the same set.
- Shuffling: each consumer reads `shuffle_buffer` documents at a time and permutes them with a generator
  seeded by (seed, pass, consumer, block): a block shuffle, so the position is a small exact state.
- Packing: each batch row is its own stream of documents, each followed by end-of-text; the next document
  goes to the row holding the fewest tokens. Rows advance by seq_len, so every token is a target once. A
  document longer than a sequence continues in the same row of the next batches: never truncated, dropped
  or padded. Attention crosses document boundaries within a sequence (as GPT-2), separated by end-of-text.
- Sharding: consumer c of C (C = ranks x workers) reads `split_dataset_by_node(docs, c, C)`: whole shards
  when they divide evenly, else every C-th document. Consumers never share a document.
- Resuming: every batch carries its consumer's state after it; the DataModule keeps the state of the last
  batch each consumer handed to a training step and saves it in the checkpoint (all ranks), so a resumed
  run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from efficia.data.base import DataModule
from efficia.data.shakespeare import FixedWindows
from efficia.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_state
from efficia.errors import DataError, TokenizerError

FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SCHEMA = ("id", "text")


def expand_files(files: str | list[str]) -> list[str]:
    """data.files: one path or glob, or a list of them; every entry must match at least one file."""
    patterns = [files] if isinstance(files, str) else list(files)
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise DataError(f"data.files: {pattern} matches no file; give local parquet/jsonl files or globs "
                            "in the hub schema (id, url, title, text)")
        found += matches
    kinds = {FILE_BUILDERS.get(Path(f).suffix) for f in found}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({Path(f).suffix for f in found})
        raise DataError(f"data.files must all be .parquet or all .jsonl/.json, got {suffixes}")
    return found


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_reachable(timeout_s: float, what: str) -> None:
    """Fail in seconds, not after `datasets`' retry loop: offline flags first, then one TCP connection."""
    hint = "offline, pass data.files=/path/to/*.parquet (or .jsonl) in the hub schema (id, url, title, text)"
    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if env_true(v)]
    if flags:
        raise DataError(f"data.files is unset, so {what} would stream from the Hugging Face hub, but "
                        f"{'/'.join(flags)} is set; {hint}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise DataError(f"cannot reach the Hugging Face hub at {endpoint} to stream {what} ({err}); {hint}") from None


def open_documents(files: str | list[str] | None, name: str, config: str | None, hub_timeout_s: float):
    """The document stream (a `datasets.IterableDataset` with at least `id` and `text`)."""
    import datasets

    if files:
        paths = expand_files(files)
        builder = FILE_BUILDERS[Path(paths[0]).suffix]
        docs = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True)
        where = f"data.files ({len(paths)} files)"
    else:
        where = f"{name} ({config})"
        check_hub_reachable(hub_timeout_s, where)
        try:
            docs = datasets.load_dataset(name, config, split="train", streaming=True)
        except Exception as err:  # hub errors come in many types; the message is what a person needs
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"cannot open {where} on the Hugging Face hub ({first}); check data.name and "
                            "data.config, or pass data.files= local files") from None
    columns = list(docs.features or {}) if docs.features else None
    if columns is not None and not all(c in columns for c in SCHEMA):
        raise DataError(f"{where} has columns {columns}; a stream needs the hub schema (id, url, title, text)")
    return docs.select_columns(list(SCHEMA))


def stream_tokenizer(cfg: dict[str, Any]) -> Tokenizer:
    tokenizer = build_tokenizer(cfg) if cfg.get("kind") != "char" else None
    if tokenizer is None or tokenizer.eot is None:
        raise TokenizerError("tokenizer=char builds its vocabulary from a whole corpus, which a stream never has; "
                             "use tokenizer=byte (UTF-8 bytes) or tokenizer=gpt2")
    return tokenizer


def held_out(docs, val_bytes: int) -> tuple[list[str], list[str]]:
    """Ids and texts of the first documents (file order) until their text reaches val_bytes UTF-8 bytes."""
    ids, texts, size = [], [], 0
    for block in docs.iter(batch_size=16):
        for doc_id, text in zip(block["id"], block["text"], strict=True):
            ids.append(doc_id)
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= val_bytes:
                return ids, texts
    raise DataError(f"data.val_bytes={val_bytes} holds out every document of the stream ({size} bytes); "
                    "lower data.val_bytes or add data.files")


class PackedStream(IterableDataset):
    """One rank's training batches [B, T] (inputs, targets, position) from its share of the documents.
    A worker's stream ends after `passes` passes over its documents (None: never).

    `start` maps a consumer slot to its saved state; `offset` rotates slots so that the first batch of a
    resumed DataLoader (always from worker 0) comes from the slot the interrupted run would have read next.
    """

    def __init__(self, docs, tokenizer_state: dict[str, Any], *, seq_len: int, batch_size: int, shuffle_buffer: int,
                 seed: int, passes: int | None, exclude: set[str], rank: int, world_size: int, num_workers: int,
                 start: dict[int, dict[str, Any]] | None = None, offset: int = 0) -> None:
        self.docs, self.tokenizer_state = docs, tokenizer_state
        self.seq_len, self.batch_size, self.shuffle_buffer = seq_len, batch_size, shuffle_buffer
        self.seed, self.passes, self.exclude = seed, passes, exclude
        self.rank, self.world_size, self.slots = rank, world_size, max(1, num_workers)
        self.start, self.offset = start or {}, offset

    def slot(self) -> int:
        info = get_worker_info()
        return ((info.id if info else 0) + self.offset) % self.slots

    def take_start(self) -> tuple[int, dict[str, Any] | None]:
        """This consumer's slot and saved state; both apply to the first iteration only (a later Lightning
        epoch, with data.passes set, starts the documents afresh)."""
        slot = self.slot()
        self.offset = 0
        return slot, self.start.pop(slot, None)

    def consumer_docs(self, slot: int, epoch: int):
        """The documents of consumer (rank, slot): disjoint from every other consumer's, all together complete."""
        from datasets.distributed import split_dataset_by_node

        docs = split_dataset_by_node(self.docs, rank=self.rank * self.slots + slot,
                                     world_size=self.world_size * self.slots)
        docs.set_epoch(epoch)
        return docs

    def documents(self, slot: int, epoch: int = 0) -> Iterator[str]:
        """Ids this consumer trains on in one pass, in file order (for checking the sharding)."""
        for block in self.consumer_docs(slot, epoch).iter(batch_size=self.shuffle_buffer):
            yield from (d for d in block["id"] if d not in self.exclude)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        slot, saved = self.take_start()
        consumer = self.rank * self.slots + slot
        tokenizer = tokenizer_from_state(self.tokenizer_state)
        pos = json.loads(saved["meta"]) if saved else {"epoch": 0, "hf": None, "block": 0, "done": 0,
                                                       "lengths": [0] * self.batch_size}
        carry = np.frombuffer(saved["carry"], dtype=np.int32) if saved else np.zeros(0, dtype=np.int32)
        rows = list(np.split(carry, np.cumsum(pos["lengths"])[:-1]))
        T = self.seq_len
        while self.passes is None or pos["epoch"] < self.passes:
            docs = self.consumer_docs(slot, pos["epoch"])
            if pos["hf"] is not None:
                docs.load_state_dict(pos["hf"])
            for block in docs.iter(batch_size=self.shuffle_buffer):
                texts = [t for d, t in zip(block["id"], block["text"], strict=True) if d not in self.exclude]
                rng = np.random.default_rng([self.seed, pos["epoch"], consumer, pos["block"]])
                order = rng.permutation(len(texts))[pos["done"]:]
                for ids in tokenizer.encode_batch([texts[i] for i in order]):
                    pos["done"] += 1
                    shortest = min(range(len(rows)), key=lambda r: len(rows[r]))
                    rows[shortest] = np.concatenate([rows[shortest], np.asarray(ids, dtype=np.int32),
                                                     np.array([tokenizer.eot], dtype=np.int32)])
                    while min(len(r) for r in rows) > T:
                        x = torch.from_numpy(np.stack([r[:T] for r in rows]).astype(np.int64))  # [B, T]
                        y = torch.from_numpy(np.stack([r[1:T + 1] for r in rows]).astype(np.int64))  # [B, T]
                        rows = [r[T:] for r in rows]
                        pos["lengths"] = [len(r) for r in rows]
                        state = {"slot": slot, "meta": json.dumps(pos), "carry": np.concatenate(rows).tobytes()}
                        yield x, y, state
                pos.update(hf=copy.deepcopy(docs.state_dict()), block=pos["block"] + 1, done=0)
            pos.update(epoch=pos["epoch"] + 1, hf=None, block=0, done=0)


class WikipediaDataModule(DataModule):
    def __init__(self, *, tokenizer: dict[str, Any], name: str, config: str | None, files: str | list[str] | None,
                 seq_len: int, batch_size: int, val_batch_size: int, val_bytes: int, shuffle_buffer: int, seed: int,
                 passes: int | None, num_workers: int, hub_timeout_s: float) -> None:
        super().__init__()
        self.tokenizer_cfg = dict(tokenizer)
        self.name, self.config = name, config
        self.files = files if files is None or isinstance(files, str) else [str(f) for f in files]
        self.seq_len, self.batch_size, self.val_batch_size = seq_len, batch_size, val_batch_size
        self.val_bytes, self.shuffle_buffer, self.seed, self.passes = val_bytes, shuffle_buffer, seed, passes
        self.num_workers, self.hub_timeout_s = num_workers, hub_timeout_s
        self.tokenizer: Tokenizer | None = None
        self.docs = None
        self.val_ids: set[str] = set()
        self.val_tokens: torch.Tensor | None = None
        self.slot_states: dict[int, dict[str, Any]] = {}  # consumer slot -> state after its last trained batch
        self.next_slot = 0
        self.restored: dict[str, Any] | None = None

    def prepare(self) -> None:
        """Tokenizer, the document stream and the held-out set (tokenized once, in memory). Idempotent."""
        if self.val_tokens is not None:
            return
        self.tokenizer = stream_tokenizer(self.tokenizer_cfg)
        self.docs = open_documents(self.files, self.name, self.config, self.hub_timeout_s)
        ids, texts = held_out(self.docs, self.val_bytes)
        self.val_ids = set(ids)
        encoded = self.tokenizer.encode_batch(texts)
        self.val_tokens = torch.tensor([t for doc in encoded for t in (*doc, self.tokenizer.eot)], dtype=torch.long)

    def describe(self) -> str:
        source = f"data.files={self.files}" if self.files else f"{self.name} {self.config} (streamed)"
        return f"{source}; {len(self.val_ids)} held-out documents, {len(self.val_tokens):,} val tokens"

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataset(self, rank: int, world_size: int) -> PackedStream:
        start, offset = {}, 0
        if self.restored is not None:
            start, offset = self.restored["slots"], self.restored["next_slot"]
        return PackedStream(self.docs, self.tokenizer.state(), seq_len=self.seq_len, batch_size=self.batch_size,
                            shuffle_buffer=self.shuffle_buffer, seed=self.seed, passes=self.passes,
                            exclude=self.val_ids, rank=rank, world_size=world_size, num_workers=self.num_workers,
                            start=start, offset=offset)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return DataLoader(self.train_dataset(rank, world_size), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(FixedWindows(self.val_tokens, self.seq_len), batch_size=self.val_batch_size, shuffle=False)

    # -- the stream position, through the checkpoint -------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Called for the batch a training step is about to use (not for prefetched ones): note its state."""
        if len(batch) == 3:
            x, y, state = batch
            self.slot_states[state["slot"]] = {"meta": state["meta"], "carry": state["carry"]}
            self.next_slot = (state["slot"] + 1) % max(1, self.num_workers)
            return x, y
        return batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, gathered from every rank (each rank reads its own documents)."""
        local = {"next_slot": self.next_slot, "num_workers": self.num_workers,
                 "slots": {s: {"meta": st["meta"], "carry": torch.frombuffer(bytearray(st["carry"]), dtype=torch.int32)}
                           for s, st in self.slot_states.items()}}
        ranks = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if len(ranks) != world_size or ranks[rank]["num_workers"] != self.num_workers:
            raise DataError(f"the checkpoint's stream position was written by {len(ranks)} process(es) with "
                            f"data.num_workers={ranks[0]['num_workers']}; resume with the same trainer.devices and "
                            f"data.num_workers (here {world_size} and {self.num_workers})")
        mine = ranks[rank]
        self.slot_states = {int(s): {"meta": st["meta"], "carry": st["carry"].numpy().tobytes()}
                            for s, st in mine["slots"].items()}
        self.next_slot = mine["next_slot"]
        self.restored = {"slots": dict(self.slot_states), "next_slot": self.next_slot}
