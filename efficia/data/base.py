"""The DataModule contract: what `train()`, the LightningModule and the callbacks may ask of any `data=` option.

A new data source subclasses `DataModule` (a LightningDataModule) and provides:

- `prepare()`: build `self.tokenizer` and whatever `describe()` needs; idempotent, called once before the
  model is built (the model's vocabulary comes from the tokenizer);
- `describe()`: one line for the run's header (sizes of the splits, or what is streamed);
- `train_dataloader()` / `val_dataloader()` yielding `(x, y)` batches of token ids, both `[B, T]`; a target
  of `IGNORE` (-100) is not scored: loss, bits per byte and accuracy count the other positions only;
- the attributes `seq_len` (training length) and `batch_size` (the GPU memory budget may lower it to a
  micro-batch);
- optionally `val_names` (one name per validation loader: metrics are logged per name when there are
  several) and `longest` (the longest sequence any loader yields; `train()` checks it fits the model).
"""

from __future__ import annotations

import abc

import lightning as L

from efficia.data.tokenizers import Tokenizer

IGNORE = -100  # the target id that is not scored (F.cross_entropy's default ignore_index)


class DataModule(L.LightningDataModule, abc.ABC):
    tokenizer: Tokenizer | None
    seq_len: int
    batch_size: int

    @abc.abstractmethod
    def prepare(self) -> None:
        """Build the tokenizer and load or generate what the splits need. Idempotent."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the run header: what is trained and validated on."""

    @property
    def val_names(self) -> list[str]:
        """One name per validation loader; a single loader is the plain `val/...` metrics."""
        return ["val"]

    @property
    def longest(self) -> int:
        """The longest sequence any loader yields (the model's context must hold it)."""
        return self.seq_len
