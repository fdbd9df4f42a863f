"""Operating the server (issue 16), on a tiny model: settings from flags, environment and config
file; backpressure (429 + Retry-After); deadlines; priorities; request log; metrics; CORS; drain
on SIGTERM; restart on failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from arborlm.runtime.server.args import HELP, ServerArgs
from conftest import LiveServer, save_tiny_model

KEY = "ops-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"max_new_tokens": 3500, "ignore_eos": True}  # seconds of decoding on the tiny model


# ---- settings -----------------------------------------------------------------------------------
def test_every_flag_has_help_and_booleans_take_no():
    text = ServerArgs.parser().format_help()
    for name in (f.name for f in __import__("dataclasses").fields(ServerArgs)):
        assert HELP.get(name), name
    assert "--no-enable-jump-forward" in text and "--no-access-log" in text
    assert ServerArgs.from_cli(["--no-enable-jump-forward"]).enable_jump_forward is False
    assert ServerArgs.from_cli([]).enable_jump_forward is True
    assert ServerArgs.from_cli(["--compile-decode"]).compile_decode is True
    assert ServerArgs.from_cli([]).compile_decode is None


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_cli_wins_over_environment_over_config_file(tmp_path, monkeypatch, suffix):
    cfg = tmp_path / f"serve.{suffix}"
    cfg.write_text("max-queued-requests: 5\nport: 31000\nenable_jump_forward: false\nlog_requests: true\n"
                   if suffix == "yaml" else
                   'max-queued-requests = 5\nport = 31000\nenable_jump_forward = false\nlog_requests = true\n')
    monkeypatch.setenv("ARBORLM_PORT", "32000")
    monkeypatch.setenv("ARBORLM_MAX_QUEUED_REQUESTS", "6")
    a = ServerArgs.from_cli(["--config", str(cfg), "--max-queued-requests", "7"])
    assert (a.max_queued_requests, a.port, a.enable_jump_forward, a.log_requests) == (7, 32000, False, True)
    monkeypatch.setenv("ARBORLM_CONFIG", str(cfg))
    monkeypatch.delenv("ARBORLM_PORT")
    a = ServerArgs.from_cli([])
    assert (a.max_queued_requests, a.port) == (6, 31000)


def test_bad_settings_name_their_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ARBORLM_PORT", "abc")
    with pytest.raises(SystemExit):
        ServerArgs.from_cli([])
    err = capsys.readouterr().err
    assert "port:" in err and "(from ARBORLM_PORT)" in err
    monkeypatch.delenv("ARBORLM_PORT")
    monkeypatch.setenv("ARBORLM_PROT", "1")
    with pytest.raises(SystemExit):
        ServerArgs.from_cli([])
    assert "ARBORLM_PROT: no such setting" in capsys.readouterr().err
    monkeypatch.delenv("ARBORLM_PROT")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_queue: 3\n")
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--config", str(cfg)])
    assert "'max_queue' is no setting" in capsys.readouterr().err


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    f = tmp_path / "key"
    f.write_text("s3cret\n")
    assert ServerArgs.from_cli(["--api-key-file", str(f)]).api_key == "s3cret"
    monkeypatch.setenv("ARBORLM_API_KEY", "from-env")
    assert ServerArgs.from_cli([]).api_key == "from-env"
    assert ServerArgs.from_cli(["--api-key-file", str(f)]).api_key == "s3cret"  # the command line wins
    with pytest.raises(SystemExit):  # both on one level: ambiguous
        ServerArgs.from_cli(["--api-key-file", str(f), "--api-key", "x"])
    assert "api_key" not in ServerArgs.from_cli([]).public()


# ---- a live server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, real_model_dir) -> str:
    """The tiny model with a 4k context, so one request can decode for seconds."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-4k")), real_model_dir, max_position_embeddings=4096)


def start(model_dir, tmp_path, *flags, new_session: bool = False) -> LiveServer:
    srv = LiveServer("--model-path", model_dir, "--dtype", "float32", "--max-total-tokens", "16384",
                     "--served-model-name", "tiny", *flags, log_path=str(tmp_path / "server.log"),
                     new_session=new_session)
    try:
        return srv.wait_healthy()
    except BaseException:
        srv.proc.kill()
        raise


@pytest.fixture(scope="module")
def ops(long_model_dir, tmp_path_factory):
    srv = start(long_model_dir, tmp_path_factory.mktemp("ops"), "--max-queued-requests", "2",
                "--max-running-requests", "1", "--request-timeout", "1.5", "--log-requests",
                "--cors-allow-origins", "http://app.test", "--api-key", KEY)
    yield srv
    srv.stop()


def gen(srv, sampling, **body):
    return httpx.post(srv.url + "/generate", json={"text": "Once upon a time", "sampling_params": sampling, **body},
                      headers=AUTH, timeout=120)


def wait_idle(srv, timeout=30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = httpx.get(srv.url + "/get_server_info", headers=AUTH, timeout=10).json()
        s = info["scheduler"]
        if s["running_requests"] == 0 and s["waiting_requests"] == 0 and info["queued_requests"] == 0:
            return info
        time.sleep(0.1)
    raise AssertionError("the server did not become idle")


def assert_pool_clean(srv) -> None:
    wait_idle(srv)
    assert httpx.post(srv.url + "/flush_cache", headers=AUTH, timeout=10).status_code == 200
    s = httpx.get(srv.url + "/get_server_info", headers=AUTH, timeout=10).json()["scheduler"]
    assert s["free_slots"] == s["pool_size"] and s["protected_tokens"] == 0
    assert s["free_request_rows"] == s["max_running_requests"]


def test_full_queue_gets_429_with_retry_after_and_priority_order(ops):
    """One request runs (max-running-requests 1), two wait (max-queued-requests 2): a fourth is
    refused. The waiting high-priority request runs before the low one that came first."""

    async def go():
        async with httpx.AsyncClient(base_url=ops.url, headers=AUTH, timeout=120) as c:
            def send(rid, priority):
                return c.post("/generate", json={"text": "Once upon a time", "rid": rid, "priority": priority,
                                                 "sampling_params": {**LONG, "timeout": 0.6 if rid == "run" else 30,
                                                                     "max_new_tokens": 3500 if rid == "run" else 4}})
            running = asyncio.ensure_future(send("run", 0))
            while (await c.get("/get_server_info")).json()["scheduler"]["running_requests"] == 0:
                await asyncio.sleep(0.02)
            low = asyncio.ensure_future(send("low", 0))
            await asyncio.sleep(0.05)
            high = asyncio.ensure_future(send("high", 10))
            await asyncio.sleep(0.05)
            refused = await send("extra", 0)
            health = await c.get("/health")
            return refused, health, await running, await low, await high

    refused, health, running, low, high = asyncio.run(go())
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and "overloaded" in err["message"]
    assert health.status_code == 200
    assert running.json()["meta_info"]["finish_reason"]["type"] == "abort"  # its own 0.6 s deadline
    lo, hi = low.json()["meta_info"], high.json()["meta_info"]
    assert lo["finish_reason"]["type"] == hi["finish_reason"]["type"] == "length"
    assert hi["e2e_latency"] < lo["e2e_latency"]  # the later, higher-priority request finished first
    metrics = httpx.get(ops.url + "/metrics", headers=AUTH).text
    assert 'arborlm:rejected_requests_total{model_name="tiny",reason="queue_full"} 1.0' in metrics
    assert_pool_clean(ops)


def test_server_wide_deadline_and_openai_finish_message(ops):
    out = gen(ops, LONG).json()  # --request-timeout 1.5
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["timeout"] == 1.5 and 0 < out["meta_info"]["completion_tokens"] < 3500
    r = httpx.post(ops.url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "timeout": 0.3})
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["finish_reason"] == "length"
    assert "timed out after 0.3 s" in choice["finish_message"]
    with httpx.stream("POST", ops.url + "/v1/completions", headers=AUTH, timeout=60, json={
            "model": "tiny", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "timeout": 0.3,
            "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "finish_message" in events[-1]["choices"][0]
    assert_pool_clean(ops)


def test_request_log_lines(ops):
    gen(ops, {"max_new_tokens": 3}, rid="logged-1")
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = [json.loads(line.split(" ", 4)[-1]) for line in open(ops.log_path) if '"logged-1"' in line]
        if lines:
            break
        time.sleep(0.1)
    (line,) = lines
    assert line["route"] == "/generate" and line["status"] == 200 and line["output_tokens"] == 3
    assert line["prompt_tokens"] > 0 and line["finish_reason"] == ["length"] and line["client"].startswith("127.0.0.1:")
    assert line["ttft_s"] is not None and line["duration_s"] >= line["ttft_s"]
    assert "prompt" not in line and "output" not in line and "Once upon" not in open(ops.log_path).read()


def test_metrics_use_sglang_names_with_model_name(ops):
    gen(ops, {"max_new_tokens": 2})
    text = httpx.get(ops.url + "/metrics", headers=AUTH).text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
                 "sglang:gen_throughput", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_bucket", "sglang:prompt_tokens_total",
                 "sglang:generation_tokens_total", "sglang:num_requests_total", "arborlm:num_queued_reqs"):
        assert f'{name}{{' in text, name
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert series and all('model_name="tiny"' in line for line in series)


def test_cors(ops):
    pre = httpx.options(ops.url + "/v1/chat/completions", headers={
        "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.test"
    r = httpx.get(ops.url + "/v1/models", headers={**AUTH, "Origin": "http://app.test"})
    assert r.headers["access-control-allow-origin"] == "http://app.test"
    other = httpx.get(ops.url + "/v1/models", headers={**AUTH, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


# ---- drain and restart --------------------------------------------------------------------------
def test_sigterm_drains(long_model_dir, tmp_path):
    """SIGTERM: new requests and /health get 503; a short running request finishes; one that
    outlasts --shutdown-timeout is aborted with what it has; the exit code is 0."""
    srv = start(long_model_dir, tmp_path, "--shutdown-timeout", "3")
    results: dict = {}

    def stream(name, n):
        with httpx.stream("POST", srv.url + "/generate", timeout=120, json={
                "text": "Once upon a time", "stream": True,
                "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        results[name] = events[-1]["meta_info"]

    try:
        threads = [threading.Thread(target=stream, args=a) for a in (("short", 60), ("long", 3500))]
        for t in threads:
            t.start()
        while httpx.get(srv.url + "/get_server_info", timeout=10).json()["scheduler"]["running_requests"] < 2:
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
        refused = httpx.post(srv.url + "/generate", json={"text": "x"}, timeout=5)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(timeout=60)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert results["short"]["finish_reason"]["type"] == "length" and results["short"]["completion_tokens"] == 60
    assert results["long"]["finish_reason"]["type"] == "abort" and results["long"]["completion_tokens"] < 3500


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_drains(long_model_dir, tmp_path, sig):
    """systemd (KillMode=control-group), `kill -TERM -- -PGID` and Ctrl-C signal every process of
    the group, the children too: the running request still finishes whole and the exit code is 0."""
    srv = start(long_model_dir, tmp_path, new_session=True)
    result: dict = {}

    def run():
        result["r"] = httpx.post(srv.url + "/generate", timeout=120, json={
            "text": "Once upon a time", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})

    try:
        t = threading.Thread(target=run)
        t.start()
        while httpx.get(srv.url + "/get_server_info", timeout=10).json()["scheduler"]["running_requests"] < 1:
            time.sleep(0.02)
        os.killpg(srv.proc.pid, sig)
        t.join(timeout=90)
        assert srv.proc.wait(timeout=60) == 0, open(srv.log_path).read()[-3000:]
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["finish_reason"]["type"] == "length"
    assert r.json()["meta_info"]["completion_tokens"] == 2000


def test_restart_on_failure(tiny_model_dir, tmp_path):
    srv = start(tiny_model_dir, tmp_path, "--restart-on-failure")
    try:
        spawned = [k for k in srv.children() if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
        os.kill(spawned[0], signal.SIGKILL)
        time.sleep(1)
        srv.wait_healthy()  # the same main process serves again, with new children
        assert srv.proc.poll() is None
        fresh = [k for k in srv.children() if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
        assert len(fresh) == 2 and not set(fresh) & set(spawned)
        assert gen(srv, {"max_new_tokens": 2}).status_code == 200
        assert "restarting the server" in open(srv.log_path).read()
    finally:
        srv.stop()
