"""Token id -> bytes for a Hugging Face tokenizer, built once per tokenizer (outlines-core needs
the vocabulary as byte strings; jump-forward needs each token's bytes to follow the text)."""

from __future__ import annotations

import re
import weakref

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _gpt2_char_to_byte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Bytes of every non-special token: byte-level BPE (GPT-2 alphabet) or SentencePiece (▁, <0xNN>).
    Built once per tokenizer object (the outlines backend and the JSON guard both read it); callers
    must not modify the dict."""
    if tokenizer not in _CACHE:
        _CACHE[tokenizer] = _token_bytes(tokenizer)
    return _CACHE[tokenizer]


def _token_bytes(tokenizer) -> dict[int, bytes]:
    special = set(tokenizer.all_special_ids)
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i not in special}
    c2b = _gpt2_char_to_byte()
    if all(ch in c2b for t in vocab for ch in t):
        return {i: bytes(c2b[ch] for ch in t) for t, i in vocab.items()}
    out = {}
    for t, i in vocab.items():
        m = _SP_BYTE.match(t)
        out[i] = bytes([int(m.group(1), 16)]) if m else t.replace("\u2581", " ").encode()
    return out
