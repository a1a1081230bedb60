"""Tokenizers: `char` (vocabulary from the corpus, saved in the checkpoint), `gpt2` (tiktoken), `byte`
(UTF-8 bytes plus an end-of-text id: nothing to build, so it suits any stream) and `ids` (data that are
token ids already, e.g. data=mqar: the text form of a token is its number).

A tokenizer round-trips through `state()` / `tokenizer_from_state`, plain types only, so a
checkpoint can rebuild it without the training data and load with `weights_only=True`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from efficia.errors import TokenizerError


class CharTokenizer:
    kind = "char"
    eot: int | None = None  # no document separator: a char vocabulary is built from one corpus

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise TokenizerError("char tokenizer: the vocabulary string has repeated characters")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def name(self) -> str:
        return f"char{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in self.stoi})
            raise TokenizerError(
                f"text contains {len(unknown)} character(s) outside this model's {self.vocab_size}-character "
                f"vocabulary: {', '.join(repr(c) for c in unknown[:10])}; remove or replace them"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token_byte_lengths(self) -> torch.Tensor:
        return torch.tensor([len(ch.encode("utf-8")) for ch in self.chars], dtype=torch.float32)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class TiktokenTokenizer:
    kind = "tiktoken"

    def __init__(self, encoding: str, cache_dir: str | None = None) -> None:
        import tiktoken

        if cache_dir:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except ValueError as err:  # an unknown encoding name
            raise TokenizerError(f"tiktoken has no encoding {encoding!r}: {err}") from None
        except Exception as err:  # no network and no cache: requests/urllib/ssl errors of many kinds
            where = os.environ.get("TIKTOKEN_CACHE_DIR", "unset")
            raise TokenizerError(
                f"could not load the tiktoken encoding {encoding!r} ({type(err).__name__}; "
                f"TIKTOKEN_CACHE_DIR={where}). Connect to the internet once, or point TIKTOKEN_CACHE_DIR "
                "(or tokenizer.cache_dir=) at a folder holding tiktoken's cached files"
            ) from None
        self.encoding = encoding
        self.eot = self.enc.eot_token  # <|endoftext|>, written between documents of a stream

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def name(self) -> str:
        return self.encoding

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several documents at once, on tiktoken's thread pool."""
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for; end-of-text separates documents and stands for no text: 0."""
        lengths = torch.tensor([len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
                               dtype=torch.float32)
        lengths[self.eot] = 0.0
        return lengths

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoding": self.encoding}


class ByteTokenizer:
    """UTF-8 bytes 0..255 and one end-of-text id 256: any text, no vocabulary to build or store."""

    kind = "byte"
    eot = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def name(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Bytes that do not form valid UTF-8 (a sampled half character) decode as U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> torch.Tensor:
        lengths = torch.ones(self.vocab_size, dtype=torch.float32)
        lengths[self.eot] = 0.0
        return lengths

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}


class IdTokenizer:
    """Token ids 0..vocab_size-1 with no text behind them (generated tasks such as MQAR). A token's text is its
    decimal number and a space, so prompts and samples read "12 4099 7 "; bits per byte count those bytes."""

    kind = "ids"
    eot: int | None = None

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise TokenizerError(f"ids tokenizer: vocab_size={vocab_size!r}: give a whole number >= 2")
        self.size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self.size

    @property
    def name(self) -> str:
        return f"ids{self.size}"

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise TokenizerError(f"ids tokenizer: {text[:40]!r} is not whitespace-separated token ids; "
                                 f"write the prompt as numbers, e.g. \"3 {self.size // 2 + 1} 5\"") from None
        outside = [i for i in ids if not 0 <= i < self.size]
        if outside:
            raise TokenizerError(f"ids tokenizer: token ids must lie in [0, {self.size}); got {outside[0]}")
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)

    def token_byte_lengths(self) -> torch.Tensor:
        return torch.tensor([len(str(i)) + 1 for i in range(self.size)], dtype=torch.float32)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.size}


Tokenizer = CharTokenizer | TiktokenTokenizer | ByteTokenizer | IdTokenizer


def build_tokenizer(cfg: dict[str, Any], corpus: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """From the `tokenizer` config group; `char` builds its vocabulary from the corpus text, `ids` takes the
    vocabulary size of data that are token ids already."""
    kind = cfg["kind"]
    if kind == "ids":
        if vocab_size is None:
            raise TokenizerError("tokenizer=ids is for data that are token ids already (data=mqar); for text use "
                                 "tokenizer=char, byte or gpt2")
        return IdTokenizer(vocab_size)
    if kind == "char":
        if corpus is None:
            raise TokenizerError("char tokenizer: a corpus is needed to build the vocabulary")
        return CharTokenizer.from_text(corpus)
    if kind == "tiktoken":
        return TiktokenTokenizer(cfg["encoding"], cfg.get("cache_dir"))
    if kind == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; use 'char', 'tiktoken', 'byte' or 'ids'")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    if state.get("kind") == "char":
        return CharTokenizer(state["chars"])
    if state.get("kind") == "tiktoken":
        return TiktokenTokenizer(state["encoding"])
    if state.get("kind") == "byte":
        return ByteTokenizer()
    if state.get("kind") == "ids":
        return IdTokenizer(state["vocab_size"])
    raise TokenizerError(f"checkpoint holds an unknown tokenizer state: {state!r}")
