"""Scale-out on Ray Serve (`--replicas N`), where Ray is installed (the `cluster` extra, part of
the dev extras): a 2-replica cluster of the tiny model: prefix routing, the fallback under
imbalance, streaming through the ingress, a killed replica restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from conftest import LiveServer, save_tiny_model

ray = pytest.importorskip("ray", reason="the cluster extra (Ray Serve) is not installed")

PREFIXES = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(60)) + "\n" for i in range(4)]


# ---- a live cluster -----------------------------------------------------------------------------


def replicas_ok(url: str) -> dict:
    try:
        r = httpx.get(url + "/health", timeout=10)
        return {k: v for k, v in r.json().get("replicas", {}).items() if v == "ok"}
    except (httpx.HTTPError, ValueError):
        return {}


def wait_replicas(srv: LiveServer, n: int, other_than=(), timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"cluster exited:\n{open(srv.log_path).read()[-3000:]}")
        ok = replicas_ok(srv.url)
        if len(ok) == n and not set(ok) & set(other_than):
            return ok
        time.sleep(1)
    raise RuntimeError(f"{n} healthy replicas not reached:\n{open(srv.log_path).read()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, real_model_dir):
    model = save_tiny_model(str(tmp_path_factory.mktemp("tiny-4k")), real_model_dir, max_position_embeddings=4096)
    srv = LiveServer("--model-path", model, "--dtype", "float32", "--max-total-tokens", "16384",
                     "--replicas", "2", "--replica-cpus", "1", "--router-imbalance", "4",
                     log_path=str(tmp_path_factory.mktemp("cluster") / "cluster.log"))
    try:
        wait_replicas(srv, 2)
        yield srv
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=90)
        except Exception:  # noqa: BLE001 - never leave a cluster behind
            srv.proc.kill()


def gen(srv, text, n=4, stream=False):
    return httpx.post(srv.url + "/generate", timeout=120, json={
        "text": text, "stream": stream, "sampling_params": {"max_new_tokens": n, "temperature": 0}})


def test_requests_sharing_a_prefix_go_to_one_replica(cluster):
    seen = {}
    for q in range(3):
        for i, p in enumerate(PREFIXES):
            r = gen(cluster, p + f"Question {q}?")
            assert r.status_code == 200
            seen.setdefault(i, set()).add(r.headers["x-arborlm-replica"])
    assert all(len(s) == 1 for s in seen.values())  # each prefix stayed on its replica
    assert len(set().union(*seen.values())) == 2  # and the prefixes spread over both
    # the later requests hit that replica's prefix cache
    r = gen(cluster, PREFIXES[0] + "Question 9?")
    assert r.json()["meta_info"]["cached_tokens"] > 50


def test_imbalance_falls_back_to_the_least_loaded(cluster):
    """Six long streams of one prefix, each held open once routed: the first five go to the
    prefix's replica (in flight there minus elsewhere <= 4), the sixth to the other one."""

    async def go():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as c:
            body = {"text": PREFIXES[3] + "Tell a long story.", "stream": True,
                    "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
            held = []
            try:
                for _ in range(6):
                    held.append(await c.send(c.build_request("POST", "/generate", json=body), stream=True))
                return [r.headers["x-arborlm-replica"] for r in held]
            finally:
                for r in held:  # closing aborts them
                    await r.aclose()

    replicas = asyncio.run(go())
    assert len(set(replicas[:5])) == 1
    assert replicas[5] != replicas[0]


def test_streaming_through_the_ingress(cluster):
    text = PREFIXES[1] + "Stream this."
    whole = gen(cluster, text, n=12).json()
    with httpx.stream("POST", cluster.url + "/generate", timeout=120, json={
            "text": text, "stream": True, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["text"] == whole["text"]
    r = httpx.post(cluster.url + "/v1/completions", timeout=60, json={"model": "default", "prompt": text, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    metrics = httpx.get(cluster.url + "/metrics", timeout=30).text
    assert metrics.count('sglang:num_requests_total{replica="') == 2


async def _streams_while_killing(url: str, texts: list[str], victim: int) -> list[list[str]]:
    """Stream each text (long answers), kill the victim process once every stream has begun."""
    started = [asyncio.Event() for _ in texts]

    async def stream(c, text, ev):
        lines = []
        body = {"text": text, "stream": True,
                "sampling_params": {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}}
        async with c.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    ev.set()
        return lines

    async def killer():
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        os.kill(victim, signal.SIGKILL)

    async with httpx.AsyncClient(base_url=url, timeout=180) as c:
        *out, _ = await asyncio.gather(*(stream(c, t, e) for t, e in zip(texts, started)), killer())
    return out


def test_a_killed_replica_is_restarted(cluster):
    """Two long streams on the two replicas; one replica's server is killed: its stream ends with
    an error event and [DONE] (as a failed stream of one server does), the other completes; the
    other replica serves meanwhile, and Serve replaces the dead one."""
    before = wait_replicas(cluster, 2)
    servers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_replica_server(int(p))]
    assert len(servers) == 2
    texts = [PREFIXES[0] + "A long answer.", PREFIXES[3] + "Another long answer."]  # new prefixes spread
    streams = asyncio.run(_streams_while_killing(cluster.url, texts, servers[0]))
    assert all(s[-1] == "data: [DONE]" for s in streams)
    errors = [json.loads(s[-2][6:])["error"] for s in streams if "error" in json.loads(s[-2][6:])]
    assert len(errors) == 1 and errors[0]["code"] == "unavailable" and "mid-stream" in errors[0]["message"]
    whole = [s for s in streams if "error" not in json.loads(s[-2][6:])]
    assert json.loads(whole[0][-2][6:])["meta_info"]["completion_tokens"] == 3000
    # meanwhile the other replica serves
    assert gen(cluster, "still here?").status_code == 200
    after = wait_replicas(cluster, 2, other_than=(), timeout=300)
    assert len(set(after) - set(before)) == 1  # one replica replaced by a new one
    assert gen(cluster, PREFIXES[2] + "after the restart").status_code == 200


def _is_replica_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"launch_server" in cmd and b"--exit-with-parent" in cmd
