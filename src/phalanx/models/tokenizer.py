"""Tokenizers behind one small interface: the model's own (Hugging Face) or a byte-level one."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 and 256 as end-of-text; for tiny test models."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer, without special tokens added on encode."""

    def __init__(self, tok) -> None:  # noqa: ANN001 - a transformers tokenizer
        self._tok = tok
        eos = tok.eos_token_id
        self.eos_id = int(eos if eos is not None else 0)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)
