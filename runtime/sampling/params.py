"""Sampling parameters: SGLang's names and defaults, validated once when a request arrives.

Every field of SGLang's sampling-params doc is accepted: most work; beam search, watermarking and a
`custom_params` paired with a custom logit processor are refused by name (UNSUPPORTED), and
`stream_interval` only changes how streamed text is chunked. docs/sglang_compat.md lists them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

import regex

from arborlm.runtime.errors import BadRequestError

GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf", "structural_tag")

# SGLang sampling parameters we do not implement: a value that asks for them is a 400 that says so
# (name -> (is the value harmless?, why not)).
UNSUPPORTED = {
    "beam_width": (lambda v: v in (0, 1), "beam search is not supported"),
    "watermark": (lambda v: not v or isinstance(v, dict) and not v.get("enabled"), "watermarking is not supported"),
}
ALIASES = {"sampling_seed": "seed"}  # SGLang's name -> ours
MAX_N = 128  # samples per prompt (OpenAI's limit; each is a request of its own)
GREEDY_BELOW = 1e-5


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


@functools.lru_cache(maxsize=256)
def compile_stop_regex(pattern: str) -> regex.Pattern:
    """Stop regexes use the `regex` module: its partial matching tells a stream what to hold back."""
    return regex.compile(pattern)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)  # stop once the output text matches one
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None  # SGLang also calls it sampling_seed
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (keys may be strings)
    stream_interval: int | None = None  # tokens per streamed chunk (None: the server's setting)
    custom_params: dict | None = None  # for a custom logit processor; accepted, read by nothing
    timeout: float | None = None  # seconds; past them the request is aborted and answers what it has
    # structured generation: at most one; json_schema is a JSON string ("$$ANY$$": any JSON object)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None  # JSON: xgrammar's format or SGLang's (structures + triggers)
    # json_schema keywords the grammar cannot enforce: refused (True) or verified after (False)
    json_schema_strict: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        if d is not None and not isinstance(d, dict):
            raise BadRequestError(f"sampling_params: must be an object, got {type(d).__name__}")
        d = {k: v for k, v in (d or {}).items() if v is not None}  # null means "default", as in SGLang
        if d.get("structural_tag") == "":
            del d["structural_tag"]  # as SGLang: an empty tag asks for nothing
        for name, (harmless, why) in UNSUPPORTED.items():
            if name in d:
                if not harmless(d.pop(name)):
                    raise BadRequestError(f"sampling_params.{name}: not supported: {why}")
        for alias, name in ALIASES.items():
            if alias in d:
                if name in d and d[name] != d[alias]:
                    raise BadRequestError(f"sampling_params.{alias} and sampling_params.{name} disagree")
                d[name] = d.pop(alias)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadRequestError(f"sampling_params.{unknown[0]}: unknown sampling parameter")
        for name in ("json_schema", "structural_tag"):  # the in-process Engine may pass the object itself
            if isinstance(d.get(name), dict):
                d[name] = json.dumps(d[name])
        for name in ("stop", "stop_regex"):
            if isinstance(d.get(name), str):
                d[name] = [d[name]] if d[name] else []
        if isinstance(d.get("logit_bias"), dict):
            d["logit_bias"] = _token_bias(d["logit_bias"])
        p = cls(**d)
        p.validate()
        return p

    def validate(self) -> None:
        def bad(name, why):
            raise BadRequestError(f"sampling_params.{name}: {why}, got {getattr(self, name)!r}")

        def check_type(name, types):
            v = getattr(self, name)
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                bad(name, f"must be {' or '.join(t.__name__ for t in types)}")

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            check_type(name, (int,))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            check_type(name, (int, float))
            if not _finite(getattr(self, name)):
                bad(name, "must be a finite number")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                     "json_schema_strict"):
            check_type(name, (bool,))
        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", "must be in [0, max_new_tokens]")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not 0.01 <= self.repetition_penalty <= 100:
            bad("repetition_penalty", "must be in [0.01, 100]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be in [1, {MAX_N}]")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of token ids")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**63):
            bad("seed", "must be an integer in [-2**63, 2**63)")
        if not isinstance(self.stop_regex, list) or not all(isinstance(s, str) and s for s in self.stop_regex):
            bad("stop_regex", "must be a non-empty string or a list of them")
        for pattern in self.stop_regex:
            try:
                compile_stop_regex(pattern)
            except regex.error as e:
                raise BadRequestError(f"sampling_params.stop_regex: {pattern!r} is not a valid regex ({e})") from None
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            bad("logit_bias", "must be an object mapping token ids to biases")
        if self.stream_interval is not None:
            check_type("stream_interval", (int,))
            if self.stream_interval < 1:
                bad("stream_interval", "must be >= 1")
        if self.timeout is not None:
            check_type("timeout", (int, float))
            if not _finite(self.timeout) or not 0 < self.timeout <= 1e7:
                bad("timeout", "must be > 0 seconds")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            bad("custom_params", "must be an object")
        self._validate_grammar()

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids that index the logits must exist (stop ids need not: they just never match).
        A top_k past the vocabulary keeps every token, as -1 does."""
        if self.top_k >= vocab_size:
            self.top_k = -1
        for t in self.logit_bias or {}:
            if t >= vocab_size:
                raise BadRequestError(f"sampling_params.logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})")

    def _validate_grammar(self) -> None:
        given = [f for f in GRAMMAR_FIELDS if getattr(self, f) is not None]
        if len(given) > 1:
            raise BadRequestError(f"sampling_params.{given[0]} and sampling_params.{given[1]} are mutually exclusive")
        for name in given:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise BadRequestError(f"sampling_params.{name}: must be a non-empty string")
        if self.json_schema is not None and self.json_schema != "$$ANY$$":
            try:
                json.loads(self.json_schema)
            except ValueError as e:
                raise BadRequestError(f"sampling_params.json_schema: not valid JSON ({e})") from None
        if self.structural_tag is not None:
            try:
                tag = json.loads(self.structural_tag)
            except ValueError as e:
                raise BadRequestError(f"sampling_params.structural_tag: not valid JSON ({e})") from None
            if not isinstance(tag, dict) or not ("format" in tag or "structures" in tag):
                raise BadRequestError("sampling_params.structural_tag: must be an object with `format` (xgrammar's "
                                      "form) or `structures` and `triggers` (SGLang's)")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are greedy, as in SGLang (dividing by them overflows)."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def constrained(self) -> bool:
        return any(getattr(self, f) is not None for f in GRAMMAR_FIELDS)

    @property
    def needs_penalty(self) -> bool:
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or bool(self.logit_bias))


def _token_bias(bias: dict) -> dict[int, float]:
    """{"123": 5} or {123: 5} -> {123: 5.0}; OpenAI's range, [-100, 100]."""
    out = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            raise BadRequestError(f"sampling_params.logit_bias: keys must be token ids, got {k!r}") from None
        if t < 0:
            raise BadRequestError(f"sampling_params.logit_bias: token id {t} is negative")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise BadRequestError(f"sampling_params.logit_bias: the bias of token {t} must be a number in [-100, 100], got {v!r}")
        out[t] = float(v)
    return out
