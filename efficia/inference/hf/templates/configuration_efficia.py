"""The transformers config of an efficia model exported as remote code (`python -m efficia.export ... format=hf`):
efficia's own model config, kept as the dict its yaml gave, the vocabulary size, and the shapes of the tensors the
model takes besides its config (efficientlm's external table: the weights hold it, so only its shape is needed)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class EfficiaConfig(PretrainedConfig):
    model_type = "efficia"

    def __init__(self, efficia_model: dict[str, Any] | None = None, vocab_size: int = 1,
                 efficia_inputs: dict[str, list[int]] | None = None, **kwargs: Any) -> None:
        self.efficia_model = dict(efficia_model or {})
        self.vocab_size = vocab_size
        self.efficia_inputs = dict(efficia_inputs or {})
        super().__init__(**kwargs)
