"""The package as a user installs it: the built wheel, not the checkout, in a fresh venv outside the
repository with only its declared dependencies, starts `arborlm serve` and answers a request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_installs_and_serves(tmp_path, tiny_model_dir):
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("arborlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in ("lang", "runtime", "kernels"):  # every package of the checkout is in the wheel
        for init in (ROOT / top).rglob("__init__.py"):
            assert f"arborlm/{top}/{init.relative_to(ROOT / top).as_posix()}" in names
    assert {f"arborlm/runtime/model/layers/csrc/{p.name}" for p in (ROOT / "runtime/model/layers/csrc").glob("*.cpp")} <= names

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, timeout=300)
    py, env = venv / "bin" / "python", {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh(py, "-m", "pip", "install", "-q", "torch==2.13.0", env=env, timeout=900)  # the CPU wheel, as the Makefile
    sh(py, "-m", "pip", "install", "-q", wheel, env=env, timeout=900)  # its declared dependencies, nothing else
    arborlm = venv / "bin" / "arborlm"
    assert "--model-path" in sh(arborlm, "serve", "--help", cwd=tmp_path, env=env, timeout=120).stdout

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([arborlm, "serve", "--model-path", tiny_model_dir, "--dtype", "float32", "--port",
                             str(port), "--log-level", "warning"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(url + "/generate", timeout=60, json={"text": "Hello", "sampling_params": {
            "max_new_tokens": 4, "temperature": 0}})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
