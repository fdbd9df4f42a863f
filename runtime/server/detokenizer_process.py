"""The detokenizer process: turns the scheduler's token ids into UTF-8-safe incremental text, trims
stop strings, and forwards everything to the tokenizer manager."""

from __future__ import annotations

import logging
import os

import zmq

from arborlm.runtime.detokenizer import IncrementalDetokenizer
from arborlm.runtime.model import loader
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.server.procutil import Endpoints, init_child, parent_alive

logger = logging.getLogger(__name__)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _State] = {}

    def process(self, batch: io.BatchTokenOut) -> io.BatchStrOut:
        return io.BatchStrOut([io.StrOut(t, self._text(t)) for t in batch.items])

    def _text(self, t: io.TokenOut) -> str:
        st = self.states.get(t.rid)
        if st is None:
            if t.error is not None:
                return ""
            skip, spaces, hold = t.detok_opts or (True, True, 0)
            st = self.states[t.rid] = _State(IncrementalDetokenizer(self.tokenizer, skip, spaces), hold)
        d = st.detok
        if t.text_ids:
            d.add(t.text_ids)
        if t.finished:
            del self.states[t.rid]
            d.flush()
            if t.text_len is not None:  # the scheduler matched a stop string: same text, trimmed
                d.text = d.text[: t.text_len]
            end = len(d.text)
        else:  # hold back what could be the start of a stop string or regex match, so a stream never shows it
            end = len(d.text) - st.hold if t.safe_len is None else min(len(d.text) - st.hold, t.safe_len)
            end = max(end, st.emitted)
        delta = d.text[st.emitted : end]
        st.emitted = end
        return delta


class _State:
    def __init__(self, detok: IncrementalDetokenizer, hold: int):
        self.detok, self.hold, self.emitted = detok, hold, 0


def run_detokenizer_process(tokenizer_dir: str, endpoints: Endpoints, ready, log_level: str = "info") -> None:
    ppid = os.getppid()
    init_child("detokenizer", log_level)
    try:
        detok = Detokenizer(loader.load_tokenizer(tokenizer_dir))
        ctx = zmq.Context()
        recv = ctx.socket(zmq.PULL)
        recv.bind(endpoints.detokenizer)
        send = ctx.socket(zmq.PUSH)
        send.connect(endpoints.tokenizer)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher
        logger.exception("detokenizer failed to start")
        ready.send(("error", f"{type(e).__name__}: {e}"))
        return
    ready.send(("ready", None))
    while True:
        if not recv.poll(1000):
            if not parent_alive(ppid):
                return
            continue
        msg = recv.recv_pyobj()
        send.send_pyobj(detok.process(msg) if isinstance(msg, io.BatchTokenOut) else msg)
