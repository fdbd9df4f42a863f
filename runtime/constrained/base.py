"""The interface every grammar backend implements, and the packed token bitmask they share.

A bitmask row is int32[ceil(vocab / 32)]: bit (i % 32) of word (i // 32) allows token i, the
layout both outlines-core and xgrammar write natively, so a matcher fills its row without copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from arborlm.runtime.errors import BadRequestError

KINDS = ("regex", "json_schema", "ebnf", "json_object", "structural_tag")
JSON_OBJECT = "$$ANY$$"  # json_schema value meaning "any JSON object" (OpenAI json_object; SGLang's spelling)


class GrammarError(BadRequestError):
    """The spec cannot be compiled (bad syntax, unsupported keyword); the message is the reason."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    value: str  # the regex, the schema or structural tag as a JSON string, the EBNF text ("" for json_object)
    # json_schema: refuse what the backend cannot enforce (True), or generate under the rest and
    # leave it to the validation of the finished document (False: what requests get by default)
    strict: bool = True

    @classmethod
    def from_params(cls, params) -> "GrammarSpec | None":
        for kind in ("regex", "json_schema", "ebnf", "structural_tag"):
            value = getattr(params, kind, None)
            if value is not None:
                if value == JSON_OBJECT:
                    return cls("json_object", "")
                has_schema = kind in ("json_schema", "structural_tag")
                return cls(kind, value, strict=bool(getattr(params, "json_schema_strict", False)) or not has_schema)
        return None


class Matcher(Protocol):
    """One request's position in its grammar."""

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the tokens allowed next into `row` (int32, zeroed by the caller)."""

    def accept(self, token: int) -> bool:
        """Advance by one token; False (and no change) if the grammar forbids it."""

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (jump-forward re-tokenises the last one)."""

    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing but end of sequence (or has taken it)."""

    def jump_forward_string(self) -> str | None:
        """The text every continuation must start with, if non-empty."""


class Grammar(Protocol):
    """A compiled spec, shared by every request that uses it."""

    def matcher(self) -> Matcher: ...


class Backend(Protocol):
    name: str

    def compile(self, spec: GrammarSpec) -> Grammar:
        """Compile or raise GrammarError with the reason; runs on a worker thread."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor) -> torch.Tensor:
    """int32[rows, words] -> bool[rows, words * 32], token i allowed at column i."""
    return ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().flatten(1)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set disallowed logits to -inf, vectorised over rows and vocabulary (columns past the
    bitmask, e.g. a padded model vocabulary, are disallowed)."""
    allowed = unpack_bitmask(bitmask)[:, : logits.shape[1]]
    if allowed.shape[1] < logits.shape[1]:
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[1] - allowed.shape[1]), value=False)
    return logits.masked_fill(~allowed, float("-inf"))
