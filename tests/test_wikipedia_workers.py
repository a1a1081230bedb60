"""What each DataLoader worker's training iterator actually packs (not the sharding helper): with
data.num_workers=2, and over 2 DDP ranks, the consumers' token streams hold disjoint documents that
together are every training document."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_wikipedia import datamodule, sample_docs  # noqa: F401  (fixture)

B, T = 3, 256


def packed_documents(batches) -> dict[int, list[str]]:
    """slot -> the complete documents in its rows (the token stream split at end-of-text, byte tokens)."""
    rows: dict[int, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in range(B)])
    last: dict[int, torch.Tensor] = {}
    for x, y, state in batches:
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
        for r in range(B):
            rows[state["slot"]][r].append(x[r])
        last[state["slot"]] = y[:, -1:]
    docs: dict[int, list[str]] = {}
    for slot, parts in rows.items():
        docs[slot] = []
        for r in range(B):
            stream = torch.cat([*parts[r], last[slot][r]]).tolist()
            *complete, _unfinished = bytes(t if t < 256 else 0 for t in stream).split(bytes([0]))
            docs[slot] += [d.decode("utf-8") for d in complete]
    return docs


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_worker_packs_its_own_documents_and_together_all(make_cfg, sample_docs, world_size: int) -> None:  # noqa: F811
    dm = datamodule(make_cfg, "tokenizer=byte", "data.val_bytes=100000", "data.passes=1", f"data.batch_size={B}",
                    f"model.max_seq_len={T}", "data.num_workers=2")
    consumers: dict[tuple[int, int], list[str]] = {}
    for rank in range(world_size):
        # world_size 1: the DataLoader the Trainer gets; 2: each rank's, built as train_dataloader builds it
        loader = dm.train_dataloader() if world_size == 1 else DataLoader(
            dm.train_dataset(rank, world_size), batch_size=None, num_workers=2)
        for slot, docs in packed_documents(loader).items():
            consumers[rank, slot] = docs
    assert set(consumers) == {(r, s) for r in range(world_size) for s in range(2)}
    everything = [d for docs in consumers.values() for d in docs]
    assert len(everything) == len(set(everything)), "no document is packed twice (by two workers or ranks)"
    train_texts = {t for i, t in sample_docs.items() if i not in dm.val_ids}
    assert set(everything) <= train_texts
    assert len(everything) >= len(train_texts) - B * len(consumers), "at most one unfinished document per row"
