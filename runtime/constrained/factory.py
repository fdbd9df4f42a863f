"""Builds the configured grammar backend once per tokenizer."""

from __future__ import annotations

from arborlm.runtime.constrained.base import Backend

BACKENDS = ("xgrammar", "outlines")


def make_backend(name: str, tokenizer, eos_id: int, vocab_size: int) -> Backend:
    if name == "xgrammar":
        from arborlm.runtime.constrained.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, eos_id, vocab_size)
    if name == "outlines":
        from arborlm.runtime.constrained.outlines_backend import OutlinesBackend

        return OutlinesBackend(tokenizer, eos_id)
    raise ValueError(f"grammar_backend: expected one of {BACKENDS}, got {name!r}")
