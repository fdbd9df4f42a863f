"""Helpers for the server's child processes: die with the parent, leave SIGINT and SIGTERM to it
(it drains, then stops them), and the ZeroMQ endpoints of one server.

A signal often reaches the whole process group or cgroup, not just the server: Ctrl-C in a
terminal, `kill -TERM -- -PGID`, systemd's default KillMode=control-group, many container inits.
Children that died of it would fail the requests the parent is draining."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the parent's to handle; children ignore them


@dataclass
class Endpoints:
    scheduler: str  # the scheduler's PULL socket (requests from the tokenizer manager)
    detokenizer: str  # the detokenizer's PULL socket (token outputs from the scheduler)
    tokenizer: str  # the tokenizer manager's PULL socket (text outputs from the detokenizer)

    @classmethod
    def fresh(cls) -> "Endpoints":
        d = tempfile.mkdtemp(prefix="arborlm-ipc-")
        return cls(*(f"ipc://{os.path.join(d, name)}" for name in ("scheduler", "detokenizer", "tokenizer")))

    def folder(self) -> str:
        return os.path.dirname(self.scheduler[len("ipc://"):])


@contextlib.contextmanager
def parent_signals_blocked():
    """Start children inside this: they inherit the blocked mask across exec, so a group signal
    that arrives while they import (seconds, for torch) waits until init_child ignores it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def init_child(name: str, log_level: str = "info") -> None:
    import logging

    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s [{name}] %(levelname)s %(message)s")
    for sig in PARENT_SIGNALS:  # ignored, then unblocked: a pending one is discarded
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)
    if sys.platform.startswith("linux"):  # the kernel kills us if the parent dies, even by SIGKILL
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid
