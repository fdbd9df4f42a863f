"""The outlines backend: regex and JSON Schema (through outlines-core's schema-to-regex) compiled
to an outlines-core token Index; interegular follows the same regex by character to find the
strings jump-forward can append."""

from __future__ import annotations

import json
import logging

from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

from arborlm.runtime.constrained.base import GrammarError, GrammarSpec
from arborlm.runtime.constrained.number_bounds import bound_regex
from arborlm.runtime.constrained.regex_fsm import ForcedStrings
from arborlm.runtime.constrained.schema_check import OUTLINES
from arborlm.runtime.constrained.schema_prep import prepare_schema
from arborlm.runtime.constrained.vocab import token_bytes

logger = logging.getLogger(__name__)

# No free whitespace between JSON tokens: it cannot loop to max_tokens, and it leaves the keys
# and separators fully forced, which is what jump-forward appends.
WHITESPACE = ""


class OutlinesBackend:
    name = "outlines"

    def __init__(self, tokenizer, eos_id: int):
        self.eos_id = eos_id
        self.token_bytes = token_bytes(tokenizer)
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in self.token_bytes.items():
            by_bytes.setdefault(b, []).append(i)
        self.vocab = Vocabulary(eos_id, by_bytes)

    def compile(self, spec: GrammarSpec) -> "OutlinesGrammar":
        regex = self._regex(spec)
        try:
            index = Index(regex, self.vocab)
        except Exception as e:  # noqa: BLE001 - outlines-core raises plain ValueError/RuntimeError
            raise GrammarError(f"{spec.kind}: {e}") from e
        try:
            forced = ForcedStrings(regex)
        except Exception as e:  # noqa: BLE001 - a regex interegular cannot read only loses jump-forward
            logger.info("no jump-forward for this grammar: %s", e)
            forced = None
        return OutlinesGrammar(index, forced, self)

    def _regex(self, spec: GrammarSpec) -> str:
        if spec.kind == "regex":
            return spec.value
        if spec.kind == "json_object":
            return bound_regex(build_regex_from_schema('{"type": "object"}', WHITESPACE))
        if spec.kind == "json_schema":
            try:
                schema = prepare_schema(spec, OUTLINES)
                return bound_regex(build_regex_from_schema(json.dumps(schema), WHITESPACE))
            except GrammarError:
                raise
            except Exception as e:  # noqa: BLE001
                raise GrammarError(f"json_schema: {e}") from e
        raise GrammarError(f"{spec.kind} is not supported by the outlines backend (use xgrammar)")


class OutlinesGrammar:
    def __init__(self, index: Index, forced: ForcedStrings | None, backend: OutlinesBackend):
        self.index, self.forced, self.backend = index, forced, backend

    def matcher(self) -> "OutlinesMatcher":
        return OutlinesMatcher(self)


class OutlinesMatcher:
    def __init__(self, grammar: OutlinesGrammar):
        self.g = grammar
        self.guide = Guide(grammar.index, max_rollback=8)
        self.ended = False  # took end of sequence
        f = grammar.forced
        # (char state, undecoded bytes of a split UTF-8 character) before each accepted token
        self.char_state = f.initial if f else None
        self.pending = b""
        self.history: list[tuple] = []

    def fill_bitmask(self, row) -> None:
        self.guide.write_mask_into(row.data_ptr(), row.numel(), 4)

    def accept(self, token: int) -> bool:
        if self.ended:
            return False
        if token == self.g.backend.eos_id:
            if not self.guide.is_finished():
                return False
            self.history.append((self.char_state, self.pending, False))
            self.ended = True
            return True
        try:
            self.guide.advance(token, return_tokens=False)
        except ValueError:
            return False
        self.history.append((self.char_state, self.pending, True))
        self._follow(self.g.backend.token_bytes[token])
        return True

    def _follow(self, data: bytes) -> None:
        if self.char_state is None:
            return
        data = self.pending + data
        try:
            text, self.pending = data.decode(), b""
        except UnicodeDecodeError as e:  # a character split across tokens: wait for the rest
            if e.start < len(data) - 3:
                self.char_state = None
                return
            text, self.pending = data[: e.start].decode(), data[e.start :]
        self.char_state = self.g.forced.step(self.char_state, text)

    def rollback(self, n: int) -> None:
        for _ in range(n):
            self.char_state, self.pending, advanced = self.history.pop()
            if advanced:
                self.guide.rollback_state(1)
            else:
                self.ended = False

    def is_terminated(self) -> bool:
        if self.ended:
            return True
        if not self.guide.is_finished():
            return False
        return self.g.index.get_allowed_tokens(self.guide.get_state()) == [self.g.backend.eos_id]

    def jump_forward_string(self) -> str | None:
        if self.char_state is None or self.pending or self.ended:
            return None
        return self.g.forced.forced_string(self.char_state) or None
