"""Our tokenizers as a `tokenizers` tokenizer.json, so `AutoTokenizer.from_pretrained(folder)` gives the same ids:

- gpt2 (any tiktoken encoding): byte-level BPE built from tiktoken's own ranks and split pattern, so nothing is
  downloaded (the ranks come from TIKTOKEN_CACHE_DIR as training used them);
- byte: the 256 bytes as byte-level tokens (ids = byte values) and <|endoftext|> at 256;
- char: the model's characters, one token each, decoded by plain concatenation.
"""

from __future__ import annotations

from typing import Any

from efficia.data.tokenizers import ByteTokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer
from efficia.errors import TokenizerError

EOT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the alphabet byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A `transformers.PreTrainedTokenizerFast` that encodes and decodes as `tokenizer` does."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    special: dict[str, int] = {}
    if isinstance(tokenizer, CharTokenizer):
        tok = RustTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(tokenizer.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
    elif isinstance(tokenizer, ByteTokenizer):
        byte_chars = bytes_to_unicode()
        tok = RustTokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        special = {EOT: tokenizer.eot}
    elif isinstance(tokenizer, TiktokenTokenizer):
        vocab, merges = bpe_from_ranks(tokenizer.enc._mergeable_ranks)
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        special = dict(tokenizer.enc._special_tokens)
    else:
        raise TokenizerError(f"no Hugging Face tokenizer for a {type(tokenizer).__name__}; use char, byte or tiktoken")
    for text, token_id in sorted(special.items(), key=lambda kv: kv[1]):
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if tok.token_to_id(text) != token_id:
            raise TokenizerError(f"special token {text!r} would get id {tok.token_to_id(text)}, not {token_id}")
    eos = EOT if EOT in special else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, clean_up_tokenization_spaces=False,
                                   model_max_length=int(1e30))


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken's {token bytes: rank} as a BPE vocabulary and merge list: every split of a token into two
    tokens of lower rank is a merge, ordered by the rank of the token it makes (what tiktoken merges first)."""
    byte_chars = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if ranks.get(left, rank) < rank and ranks.get(right, rank) < rank:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]
