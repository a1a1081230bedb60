"""Hugging Face folders efficia did not write: OpenAI's GPT-2 (any size, 124M included) as `model=gpt
pos_emb=learned bias=true gelu=tanh`, read with the same mapping table the GPT2LMHeadModel export uses
(hf/native.py) run backwards, and GPT-2's BPE through tiktoken.

Only safetensors are read (no pickle). The hub's GPT-2 files name tensors without the `transformer.` prefix and
carry the causal-mask buffers `attn.bias` / `attn.masked_bias`; both layouts load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from efficia.errors import CheckpointError

GPT2_VOCAB = 50257  # tiktoken's gpt2 encoding; a folder with another vocabulary has another tokenizer
GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # transformers' names -> model.gelu
MASK_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # GPT-2's causal mask, not a weight


def transformers_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json if transformers wrote it (it names a model_type), else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def gpt2_model_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """efficia's `model=gpt` keys for a transformers GPT2Config; one line for a setting gpt does not compute."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; efficia's gpt computes GPT-2 with learned positions, biases and "
                               "LayerNorm eps 1e-5 only")

    act = config.get("activation_function", "gelu_new")
    if act not in GELU:
        raise refuse(f"activation_function={act!r} is not a GELU")
    if config.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise refuse(f"layer_norm_epsilon={config['layer_norm_epsilon']}")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse("its attention scores are not scaled by 1/sqrt(head_dim)")
    if not config.get("tie_word_embeddings", True):
        raise refuse("its head is not tied to the token embedding")
    n_embd = config.get("n_embd", 768)
    return {"name": "gpt", "d_model": n_embd, "n_layer": config.get("n_layer", 12), "n_head": config.get("n_head", 12),
            "n_kv_head": None, "max_seq_len": config.get("n_positions", 1024),
            "dropout": float(config.get("resid_pdrop", 0.1)), "ffn_hidden": config.get("n_inner") or 4 * n_embd,
            "bias": True, "pos_emb": "learned", "rope_theta": 10000.0, "tie_embeddings": True,
            "gradient_checkpointing": False, "gelu": GELU[act]}


def gpt2_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """GPT2LMHeadModel's names (`transformer.` prefix, no mask buffers, no separate copy of the tied head)."""
    out = {}
    for name, tensor in tensors.items():
        if MASK_BUFFER.search(name) or name == "lm_head.weight":
            continue
        out[name if name.startswith("transformer.") else f"transformer.{name}"] = tensor
    return out


def load_transformers_folder(folder: Path, config: dict[str, Any], sampling: dict[str, Any],
                             device: str = "cpu") -> Any:
    """A LoadedModel of a transformers folder efficia did not write (GPT-2 only; others are refused in one line)."""
    from efficia.build import build_model
    from efficia.data.tokenizers import TiktokenTokenizer
    from efficia.inference.hf import _load_into, _read_weights
    from efficia.inference.hf.native import GPT2, convert, unique_tensors
    from efficia.inference.loading import LoadedModel, pick_device

    kind = config.get("model_type")
    if kind != "gpt2":
        raise CheckpointError(f"{folder}: a transformers {kind!r} model that efficia did not export; efficia reads "
                              "GPT-2 folders (model_type gpt2) and the folders `python -m efficia.export "
                              "format=hf` writes")
    vocab = config.get("vocab_size", GPT2_VOCAB)
    if vocab != GPT2_VOCAB:
        raise CheckpointError(f"{folder}: vocab_size={vocab} is not GPT-2's {GPT2_VOCAB}, so its tokenizer is not "
                              "GPT-2's BPE (the one efficia reads with tiktoken)")
    model_cfg = gpt2_model_config(config, folder)
    net = build_model(model_cfg, vocab)
    ours, _ = unique_tensors(net)
    tensors = gpt2_tensors(_read_weights(folder))
    _load_into(net, convert(GPT2, None, tensors, ours, net.n_layer, to_hf=False), f"{folder}")
    cfg = {"model": model_cfg, "tokenizer": {"kind": "tiktoken", "encoding": "gpt2"}, "sampling": sampling}
    return LoadedModel(net.to(pick_device(device)).eval(), TiktokenTokenizer("gpt2"), cfg)
