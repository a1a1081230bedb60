"""Native transformers classes for the architectures whose math one of them already computes, as data:
each `Native` is a transformers class, its config read off our built model, and a table of rules mapping our
tensor names to theirs. Our model's own yaml keys are never read here (the modules carry every size), so a
renamed config key cannot break an export.

A rule concatenates our tensors along dim 0, reorders rows by a named permutation (`ROWS`), and splits the
result into theirs; import runs the same rule backwards. A tensor of theirs that we do not have (a bias our
bias-free model lacks) is written as zeros, and on import must be zero. Every tensor on each side must be
covered by exactly one rule, else the export fails with one line naming it.

    optimus (MLA)     -> DeepseekV2ForCausalLM   (all layers dense: first_k_dense_replace = n_layer)
    optimus (GQA)     -> LlamaForCausalLM
    gpt (RoPE)        -> Starcoder2ForCausalLM   (LayerNorm, GELU MLP, full-head RoPE, MHA or GQA, bias flag)
    gpt (learned pos) -> GPT2LMHeadModel         (MHA only; GPT-2's Conv1D stores weights transposed)

RoPE pairing: we rotate pairs (i, i + R/2) (Llama's rotate_half, which Llama and Starcoder2 share);
DeepSeek-V2 rotates (2i, 2i + 1), so its rope rows of q_b_proj/q_proj and kv_a_proj_with_mqa are permuted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from efficia.errors import CheckpointError


class Unsupported(Exception):
    """This model's settings are outside what the native class computes (the reason says which)."""


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    rows: str | None = None  # a permutation in ROWS: theirs (concatenated) = ours (concatenated)[perm]
    transpose: bool = False  # theirs stores [in, out]
    zeros: bool = False  # ours lacks it (bias=False): theirs is zeros, and must be zero to import


def rule(ours: str | tuple[str, ...], theirs: str | tuple[str, ...], **kw: Any) -> Rule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
    return Rule(as_tuple(ours), as_tuple(theirs), **kw)


@dataclass(frozen=True)
class Native:
    hf_class: str
    config: Callable[[nn.Module], dict[str, Any]]  # raises Unsupported when the model does not fit
    rules: tuple[Rule, ...]


# --- row permutations (functions of the transformers config) ----------------------------------------------

def rope_pairs(width: int) -> Tensor:
    """DeepSeek's rope row j holds our row perm[j]: (2i, 2i+1) <- (i, i + R/2)."""
    half = torch.arange(width // 2)
    return torch.stack((half, half + width // 2), dim=1).flatten()


def mla_query_rows(c: Any) -> Tensor:
    """Per head [nope | rope] in both; the rope part re-paired."""
    nope, rope = c.qk_nope_head_dim, c.qk_rope_head_dim
    head = torch.cat((torch.arange(nope), nope + rope_pairs(rope)))
    return torch.cat([h * (nope + rope) + head for h in range(c.num_attention_heads)])


def mla_kv_a_rows(c: Any) -> Tensor:
    """[c_kv | k_R] in both; k_R re-paired."""
    return torch.cat((torch.arange(c.kv_lora_rank), c.kv_lora_rank + rope_pairs(c.qk_rope_head_dim)))


def mla_kv_b_rows(c: Any) -> Tensor:
    """Ours: [W_uk (H·nope rows) ; W_uv (H·v rows)]; DeepSeek's kv_b_proj: per head [nope rows, v rows]."""
    H, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    return torch.cat([torch.cat((torch.arange(h * nope, (h + 1) * nope), H * nope + torch.arange(h * v, (h + 1) * v)))
                      for h in range(H)])


ROWS: dict[str, Callable[[Any], Tensor]] = {"mla_query": mla_query_rows, "mla_kv_a": mla_kv_a_rows,
                                            "mla_kv_b": mla_kv_b_rows}


# --- what our model is (read off its modules) ---------------------------------------------------------------

def need(ok: bool, reason: str) -> None:
    if not ok:
        raise Unsupported(reason)


def kind(module: nn.Module) -> str:
    return type(module).__name__


def uniform_norm(net: nn.Module, cls: str) -> float:
    """The one eps of every block and final norm, all of class `cls` (else Unsupported)."""
    norms = [net.norm, *(n for b in net.blocks for n in (b.norm1, b.norm2))]
    need(all(kind(n) == cls for n in norms), f"its norms are not all {cls}")
    eps = {n.eps for n in norms}
    need(len(eps) == 1, "its norms use different eps")
    return eps.pop()


def common(net: nn.Module) -> dict[str, Any]:
    return {"vocab_size": net.tok_emb.num_embeddings, "hidden_size": net.d_model, "num_hidden_layers": net.n_layer,
            "max_position_embeddings": net.max_seq_len, "tie_word_embeddings": tied(net), "dtype": dtype_name(net)}


def dtype_name(net: nn.Module) -> str:
    """The weights' dtype as transformers' config names it ("bfloat16"): the folder keeps the checkpoint's."""
    return str(net.param_dtype).removeprefix("torch.")


def tied(net: nn.Module) -> bool:
    return net.lm_head.weight is net.tok_emb.weight


def swiglu_size(net: nn.Module) -> int:
    ffn = net.blocks[0].ffn
    need(kind(ffn) == "GatedFeedForward" and ffn.act is torch.nn.functional.silu and ffn.gate.bias is None,
         "its feed-forward is not a bias-free SwiGLU")
    return ffn.gate.out_features


def attention_heads(mixer: nn.Module) -> dict[str, Any]:
    need(kind(mixer) == "CausalSelfAttention", "its attention is not the shared causal self-attention")
    need(mixer.window is None, "its attention is a sliding window")
    return {"num_attention_heads": mixer.n_head, "num_key_value_heads": mixer.n_kv_head, "head_dim": mixer.head_dim}


def deepseek_v2(net: nn.Module) -> dict[str, Any]:
    m = net.blocks[0].mixer
    need(kind(m) == "MultiHeadLatentAttention", "its attention is not MLA")
    need(net.pos_emb is None, "it has learned positions")
    eps = uniform_norm(net, "RMSNorm")
    latent_norms = [n for n in (m.kv.norm, m.query.norm) if n is not None]
    need(all(kind(n) == "RMSNorm" and n.eps == 1e-6 for n in latent_norms),
         "DeepseekV2 fixes its latent norms to RMSNorm with eps 1e-6")
    n_head = m.heads.n_head
    return {**common(net), "model_type": "deepseek_v2", "intermediate_size": swiglu_size(net),
            "num_attention_heads": n_head, "num_key_value_heads": n_head, "hidden_act": "silu", "rms_norm_eps": eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": m.dropout,
            "kv_lora_rank": m.kv.d_c, "q_lora_rank": m.query.down.out_features if m.query.down is not None else None,
            "qk_nope_head_dim": m.heads.head_dim, "qk_rope_head_dim": m.kv.d_rope, "v_head_dim": m.heads.v_head_dim,
            # no mixture of experts: every layer is the dense SwiGLU
            "first_k_dense_replace": net.n_layer, "n_routed_experts": 1, "n_shared_experts": 1,
            "num_experts_per_tok": 1, "moe_intermediate_size": 1}


def llama(net: nn.Module) -> dict[str, Any]:
    m = net.blocks[0].mixer
    heads = attention_heads(m)
    need(m.rope_theta is not None and net.pos_emb is None, "it does not use RoPE")
    need(m.qkv.bias is None, "its attention has biases")
    return {**common(net), **heads, "model_type": "llama", "intermediate_size": swiglu_size(net),
            "hidden_act": "silu", "rms_norm_eps": uniform_norm(net, "RMSNorm"),
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": m.dropout}


def gelu_mlp(net: nn.Module) -> nn.Module:
    ffn = net.blocks[0].ffn
    need(kind(ffn) == "MLP", "its feed-forward is not the GELU MLP")
    return ffn


def gelu_name(net: nn.Module, tanh: str) -> str:
    """transformers' name for the MLP's GELU: "gelu" (exact) or `tanh`, the class's name for the approximation."""
    return tanh if gelu_mlp(net).approximate == "tanh" else "gelu"


def starcoder2(net: nn.Module) -> dict[str, Any]:
    m = net.blocks[0].mixer
    heads = attention_heads(m)
    need(m.rope_theta is not None and net.pos_emb is None, "it uses learned positions, not RoPE")
    return {**common(net), **heads, "model_type": "starcoder2", "intermediate_size": gelu_mlp(net).fc.out_features,
            "hidden_act": gelu_name(net, "gelu_pytorch_tanh"), "norm_epsilon": uniform_norm(net, "LayerNorm"),
            "use_bias": m.qkv.bias is not None,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "sliding_window": None,
            "attention_dropout": m.dropout, "residual_dropout": m.dropout, "embedding_dropout": net.drop.p}


def gpt2(net: nn.Module) -> dict[str, Any]:
    m = net.blocks[0].mixer
    heads = attention_heads(m)
    need(net.pos_emb is not None and m.rope_theta is None, "it uses RoPE, not learned positions")
    need(heads["num_key_value_heads"] == heads["num_attention_heads"], "GPT-2 has no grouped-query attention")
    need(tied(net), "its head is untied")
    c = common(net)
    return {"model_type": "gpt2", "vocab_size": c["vocab_size"], "n_positions": net.max_seq_len, "n_embd": net.d_model,
            "n_layer": net.n_layer, "n_head": m.n_head, "n_inner": gelu_mlp(net).fc.out_features,
            "activation_function": gelu_name(net, "gelu_new"), "layer_norm_epsilon": uniform_norm(net, "LayerNorm"),
            "resid_pdrop": m.dropout, "embd_pdrop": net.drop.p, "attn_pdrop": m.dropout,
            "tie_word_embeddings": True, "dtype": c["dtype"]}


# --- the tables --------------------------------------------------------------------------------------------

B, L = "blocks.{i}", "model.layers.{i}"
HEAD = rule("lm_head.weight", "lm_head.weight")  # an untied head (tied, both sides alias it to the embedding)
RMS_BLOCK = (rule("tok_emb.weight", "model.embed_tokens.weight"), HEAD, rule("norm.weight", "model.norm.weight"),
             rule(f"{B}.norm1.weight", f"{L}.input_layernorm.weight"),
             rule(f"{B}.norm2.weight", f"{L}.post_attention_layernorm.weight"),
             rule(f"{B}.ffn.gate.weight", f"{L}.mlp.gate_proj.weight"),
             rule(f"{B}.ffn.up.weight", f"{L}.mlp.up_proj.weight"),
             rule(f"{B}.ffn.down.weight", f"{L}.mlp.down_proj.weight"))
QKV_SPLIT = tuple(rule(f"{B}.mixer.qkv.{p}", tuple(f"{L}.self_attn.{x}_proj.{p}" for x in "qkv"))
                  for p in ("weight", "bias")) + tuple(
    rule(f"{B}.mixer.proj.{p}", f"{L}.self_attn.o_proj.{p}") for p in ("weight", "bias"))

DEEPSEEK_V2 = Native("DeepseekV2ForCausalLM", deepseek_v2, RMS_BLOCK + (
    rule(f"{B}.mixer.query.down.weight", f"{L}.self_attn.q_a_proj.weight"),
    rule(f"{B}.mixer.query.norm.weight", f"{L}.self_attn.q_a_layernorm.weight"),
    rule(f"{B}.mixer.query.up.weight", f"{L}.self_attn.q_b_proj.weight", rows="mla_query"),
    rule(f"{B}.mixer.query.up.weight", f"{L}.self_attn.q_proj.weight", rows="mla_query"),  # q_lora_rank null
    rule(f"{B}.mixer.kv.down.weight", f"{L}.self_attn.kv_a_proj_with_mqa.weight", rows="mla_kv_a"),
    rule(f"{B}.mixer.kv.norm.weight", f"{L}.self_attn.kv_a_layernorm.weight"),
    rule((f"{B}.mixer.heads.uk.weight", f"{B}.mixer.heads.uv.weight"), f"{L}.self_attn.kv_b_proj.weight",
         rows="mla_kv_b"),
    rule(f"{B}.mixer.proj.weight", f"{L}.self_attn.o_proj.weight")))

LLAMA = Native("LlamaForCausalLM", llama, RMS_BLOCK + QKV_SPLIT)

STARCODER2 = Native("Starcoder2ForCausalLM", starcoder2, (
    rule("tok_emb.weight", "model.embed_tokens.weight"), HEAD, *QKV_SPLIT,
    *(rule(f"{ours}.{p}", f"{theirs}.{p}", zeros=p == "bias")
      for ours, theirs in (("norm", "model.norm"), (f"{B}.norm1", f"{L}.input_layernorm"),
                           (f"{B}.norm2", f"{L}.post_attention_layernorm"))
      for p in ("weight", "bias")),
    *(rule(f"{B}.ffn.{ours}.{p}", f"{L}.mlp.{theirs}.{p}") for ours, theirs in (("fc", "c_fc"), ("proj", "c_proj"))
      for p in ("weight", "bias"))))

H = "transformer.h.{i}"
GPT2 = Native("GPT2LMHeadModel", gpt2, (
    rule("tok_emb.weight", "transformer.wte.weight"), rule("pos_emb.weight", "transformer.wpe.weight"),
    *(rule(f"{ours}.{p}", f"{theirs}.{p}", zeros=p == "bias")
      for ours, theirs in (("norm", "transformer.ln_f"), (f"{B}.norm1", f"{H}.ln_1"), (f"{B}.norm2", f"{H}.ln_2"))
      for p in ("weight", "bias")),
    *(rule(f"{B}.{ours}.{p}", f"{H}.{theirs}.{p}", transpose=True, zeros=p == "bias")
      for ours, theirs in (("mixer.qkv", "attn.c_attn"), ("mixer.proj", "attn.c_proj"), ("ffn.fc", "mlp.c_fc"),
                           ("ffn.proj", "mlp.c_proj"))
      for p in ("weight", "bias"))))

# Candidates per registered model, tried in order; a model without an entry (or none that fits) exports as
# remote code.
NATIVE: dict[str, tuple[Native, ...]] = {"optimus": (DEEPSEEK_V2, LLAMA), "gpt": (STARCODER2, GPT2)}


def choose(net: nn.Module) -> tuple[Native | None, str]:
    """The first native class that computes this model, or None and why none does."""
    reasons = []
    for native in NATIVE.get(net.registry_name, ()):
        try:
            native.config(net)
            return native, native.hf_class
        except Unsupported as why:
            reasons.append(f"not {native.hf_class}: {why}")
    return None, "; ".join(reasons) or "no transformers class computes this architecture"


# --- applying a table --------------------------------------------------------------------------------------

def unique_tensors(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """state_dict names -> tensors, each shared tensor (a tied head) under its first name; and alias -> name."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            unique[name] = tensor.detach()
    return unique, aliases


def expand(rules: tuple[Rule, ...], n_layer: int) -> list[Rule]:
    out = []
    for r in rules:
        layers = range(n_layer) if any("{i}" in n for n in (*r.ours, *r.theirs)) else [None]
        for i in layers:
            fill = (lambda n: n) if i is None else (lambda n, i=i: n.format(i=i))
            out.append(Rule(tuple(map(fill, r.ours)), tuple(map(fill, r.theirs)), r.rows, r.transpose, r.zeros))
    return out


def _rows(x: Tensor, transpose: bool) -> Tensor:
    return x.t() if transpose and x.dim() == 2 else x


def convert(native: Native, hf_config: Any, source: dict[str, Tensor], target: dict[str, Tensor], n_layer: int,
            to_hf: bool) -> dict[str, Tensor]:
    """Tensors for every name in `target` (shapes only are read) from `source`, by the table, either way.
    Raises CheckpointError (one line) for a tensor on either side that no rule covers."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    where = f"{'export to' if to_hf else 'import from'} {native.hf_class}"
    for r in expand(native.rules, n_layer):
        ours_side, theirs_side = (source, target) if to_hf else (target, source)
        if not all(n in theirs_side for n in r.theirs):
            continue  # a rule for a layout this config does not have
        if not all(n in ours_side for n in r.ours):
            if not r.zeros:
                continue
            if to_hf:  # a bias our model lacks
                out.update({n: torch.zeros_like(target[n]) for n in r.theirs})
            else:
                nonzero = [n for n in r.theirs if bool(source[n].any())]
                if nonzero:
                    raise CheckpointError(f"{where}: {nonzero[0]} is not zero, and efficia's model has no such "
                                          "tensor (export a model built with bias=true)")
                used.update(r.theirs)
            continue
        src, dst = (r.ours, r.theirs) if to_hf else (r.theirs, r.ours)
        x = torch.cat([_rows(source[n], r.transpose and not to_hf) for n in src])
        if r.rows is not None:
            perm = ROWS[r.rows](hf_config)
            x = x[perm] if to_hf else x[torch.argsort(perm)]
        sizes = [_rows(target[n], r.transpose and to_hf).shape[0] for n in dst]
        if sum(sizes) != x.shape[0]:
            raise CheckpointError(f"{where}: {'+'.join(src)} has {x.shape[0]} rows, {'+'.join(dst)} needs {sum(sizes)}")
        for n, piece in zip(dst, x.split(sizes), strict=True):
            out[n] = _rows(piece, r.transpose and to_hf).contiguous().clone()
        used.update(src)
    unmapped = [n for n in source if n not in used]
    missing = [n for n in target if n not in out]
    counts = f"({len(unmapped)} unmapped, {len(missing)} missing)"
    if to_hf and (unmapped or missing):
        what = (f"no rule takes efficia's tensor {unmapped[0]}" if unmapped
                else f"no rule makes transformers' tensor {missing[0]}")
        raise CheckpointError(f"{where}: {what}; the mapping table in efficia/inference/hf/native.py is incomplete "
                              f"{counts}")
    if unmapped:  # a folder efficia did not write as it stands, or whose weights and efficia.json disagree
        raise CheckpointError(f"{where}: the folder's tensor {unmapped[0]} has no place in the model its efficia.json "
                              f"describes ({n_layer} layers) {counts}; export the model again")
    if missing:
        raise CheckpointError(f"{where}: the folder lacks what efficia's tensor {missing[0]} is made from {counts}; "
                              "export the model again")
    return out
