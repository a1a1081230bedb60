"""A transformers wrapper around an efficia model, written by `python -m efficia.export ... format=hf`.

The architecture is efficia's own source, copied beside this file with its imports made relative, so it computes
what efficia computes and needs only torch and transformers. `generate()` drives the model's own decoding state
(latent, slot, ring or recurrent: whatever its mixers keep), never a per-head K/V cache.

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).generate(ids, max_new_tokens=32)

Prompts in one batch must have one length (the models take no padding mask). A model with a bounded context
(learned positions, a full K/V cache) stops with an error past its max_seq_len.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_efficia import EfficiaConfig
from .gpt import GPT  # noqa: F401  efficia:architecture (export writes the exported model's module here)
from .registry import construct

# transformers 5 passes the decoding state as `cache`, 4.x as `past_key_values`
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class EfficiaCache:
    """efficia's decoding state (one object per layer, owned by its mixer) in the shape generate() carries."""

    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.pos


class EfficiaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EfficiaConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}  # applied when tie_word_embeddings

    def __init__(self, config: EfficiaConfig) -> None:
        super().__init__(config)
        inputs = {name: torch.zeros(shape) for name, shape in config.efficia_inputs.items()}  # filled by the weights
        self.model = construct(config.efficia_model, config.vocab_size, **inputs)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """efficia's own init ran when the model was built; trained weights come from model.safetensors."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is efficia's own (prepare_inputs_for_generation makes it)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        state = kwargs.get("cache") or kwargs.get("past_key_values")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("efficia models take no padding mask: give prompts of one length, or one at a time")
        logits = self.model(input_ids, cache=state.inner if state is not None else None)  # [B, T, V]
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: state})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool = True, **kwargs: Any) -> dict[str, Any]:
        """The first call makes the model's decoding state; each call then feeds only the tokens it has not seen."""
        state = kwargs.get("cache") or kwargs.get("past_key_values")
        if use_cache:
            if state is None:
                state = EfficiaCache(self.model.new_cache(input_ids.shape[0]))
            input_ids = input_ids[:, state.inner.pos:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE: state, "use_cache": use_cache}
