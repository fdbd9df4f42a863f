"""Helpers for the server's child processes: die with the parent, ignore Ctrl-C (the parent
handles it and stops the children), and the ZeroMQ endpoints of one server."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1


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


def init_child(name: str, log_level: str = "info") -> None:
    import logging

    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s [{name}] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # the kernel kills us if the parent dies, even by SIGKILL
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid
