"""The xgrammar backend: JSON Schema, regex, EBNF, any-JSON-object and structural tags, compiled against the
tokenizer's vocabulary; its matcher offers rollback and jump-forward strings natively."""

from __future__ import annotations

import json

import torch
import xgrammar as xgr

from arborlm.runtime.constrained.base import GrammarError, GrammarSpec, bitmask_words, unpack_bitmask
from arborlm.runtime.constrained.number_bounds import bound_schema
from arborlm.runtime.constrained.schema_check import XGRAMMAR
from arborlm.runtime.constrained.schema_prep import prepare_schema
from arborlm.runtime.constrained.structural_tag import to_xgrammar

# Fixed separators and no free whitespace: nothing to loop on, and keys/separators become forced
# strings that jump-forward appends.
SEPARATORS = (", ", ": ")


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, eos_id: int, vocab_size: int):
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_id])
        # Our own LRU caches results and a thread pool runs compiles: one thread, no second cache.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.words = bitmask_words(vocab_size)

    def compile(self, spec: GrammarSpec) -> "XGrammarGrammar":
        try:
            if spec.kind == "json_schema":
                schema = prepare_schema(spec, XGRAMMAR)
                compiled = self.compiler.compile_json_schema(
                    json.dumps(bound_schema(schema)), any_whitespace=False, separators=SEPARATORS, strict_mode=True)
            elif spec.kind == "json_object":
                compiled = self.compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, separators=SEPARATORS, strict_mode=False)
            elif spec.kind == "regex":
                compiled = self.compiler.compile_regex(spec.value)
            elif spec.kind == "ebnf":
                compiled = self.compiler.compile_grammar(spec.value)
            elif spec.kind == "structural_tag":
                compiled = self.compiler.compile_structural_tag(to_xgrammar(spec.value, spec.strict, XGRAMMAR))
            else:
                raise GrammarError(f"unknown grammar kind {spec.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the parser's reason
            raise GrammarError(f"{spec.kind}: {_reason(e)}") from e
        return XGrammarGrammar(compiled, self.words)


def _reason(e: Exception) -> str:
    """xgrammar prefixes its messages with a timestamp and a C++ source location."""
    msg = str(e).strip()
    return msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg


class XGrammarGrammar:
    def __init__(self, compiled, words: int):
        self.compiled, self.words = compiled, words

    def matcher(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self)


class XGrammarMatcher:
    def __init__(self, grammar: XGrammarGrammar):
        self.m = xgr.GrammarMatcher(grammar.compiled)
        self.scratch = torch.zeros(1, grammar.words, dtype=torch.int32)
        self.stop_ids = sorted(self.m.stop_token_ids)

    def fill_bitmask(self, row) -> None:
        self.m.fill_next_token_bitmask(row.unsqueeze(0))

    def accept(self, token: int) -> bool:
        return self.m.accept_token(token)

    def rollback(self, n: int) -> None:
        self.m.rollback(n)

    def can_end(self) -> bool:
        """The output so far is a complete document (the JSON guard's closing estimate reads it;
        it also needs rollback of any length, which this matcher has)."""
        return self.m.is_completed()

    def is_terminated(self) -> bool:
        if self.m.is_terminated():
            return True
        if not self.m.is_completed():
            return False
        self.m.fill_next_token_bitmask(self.scratch)
        return unpack_bitmask(self.scratch).nonzero()[:, 1].tolist() == self.stop_ids

    def jump_forward_string(self) -> str | None:
        if self.m.is_terminated():
            return None
        return self.m.find_jump_forward_string() or None
