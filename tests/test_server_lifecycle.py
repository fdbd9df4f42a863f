"""Process lifecycle on a tiny model: SIGTERM leaves no child; a crashed child stops the server."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from conftest import LiveServer


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def tiny_server(tiny_model_dir, tmp_path):
    srv = LiveServer("--model-path", tiny_model_dir, "--dtype", "float32", "--max-total-tokens", "1024",
                     log_path=str(tmp_path / "log"))
    try:
        yield srv.wait_healthy()
    finally:  # a failed test must not leave a server behind
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(timeout=30)


def test_sigterm_leaves_no_child(tiny_server):
    srv = tiny_server
    kids = srv.children()
    assert len(kids) >= 2  # scheduler and detokenizer
    r = httpx.post(srv.url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3}}, timeout=60)
    assert r.status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids)


def test_crashed_scheduler_fails_health_and_exits(tiny_server):
    srv = tiny_server
    kids = srv.children()
    spawned = [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
    assert len(spawned) == 2  # scheduler and detokenizer (not multiprocessing's resource tracker)
    os.kill(spawned[0], signal.SIGKILL)  # either child: the server must notice and stop the other
    assert srv.proc.wait(timeout=30) != 0
    assert "exited unexpectedly" in open(srv.log_path).read()
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2)
