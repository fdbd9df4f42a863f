"""Stops read from the output text: stop strings and stop regexes (SGLang's `stop`, `stop_regex`).

`find_stop` says where the first match in the text begins (the text is trimmed there unless
`no_stop_trim`); `stream_safe_len` says how much of a running request's text a stream may show:
nothing that could still become the start of a match, so a streamed chunk is never taken back.
Pure functions of (text, params): the scheduler, the in-process Engine and the detokenizer share them.
"""

from __future__ import annotations

from arborlm.runtime.sampling.params import SamplingParams, compile_stop_regex


def has_text_stops(p: SamplingParams) -> bool:
    return bool(p.stop or p.stop_regex)


def find_stop(text: str, p: SamplingParams, new_chars: int) -> tuple[int, str] | None:
    """The earliest stop match as (start, matched text), or None. `new_chars` is how much text the
    last step added: a stop string can only have completed in that tail, a regex is searched whole
    (a match may begin anywhere, and an earlier one would have stopped an earlier step)."""
    hits = []
    if p.stop:
        start = max(0, len(text) - new_chars - max(len(s) for s in p.stop) + 1)
        hits += [(pos, s) for s in p.stop if (pos := text.find(s, start)) >= 0]
    for pattern in p.stop_regex:
        m = compile_stop_regex(pattern).search(text)
        if m is not None and m.end() > m.start():  # an empty match (e.g. "x*") is no stop
            hits.append((m.start(), m.group(0)))
    return min(hits) if hits else None


def stream_safe_len(text: str, p: SamplingParams) -> int:
    """Length of the prefix of a running request's text that no later stop can take back."""
    safe = len(text)
    if p.stop:
        longest = max(len(s) for s in p.stop)
        # the start of the earliest suffix that is a proper prefix of some stop string
        for i in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in p.stop):
                safe = i
                break
    for pattern in p.stop_regex:
        m = compile_stop_regex(pattern).search(text, partial=True)
        if m is not None and m.partial:
            safe = min(safe, m.start())
    return safe
