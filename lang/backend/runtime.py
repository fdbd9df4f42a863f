"""`Runtime`: SGLang's "launch a server and use it" backend, here an `arborlm serve` subprocess on a
free loopback port with a RuntimeEndpoint pointed at it. Keyword arguments are server flags
(`Runtime(model_path=..., kv_cache_gb=2)` -> `--model-path ... --kv-cache-gb 2`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from arborlm.lang.backend.runtime_endpoint import RuntimeEndpoint


def _flags(kwargs: dict) -> list[str]:
    out = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


class Runtime(RuntimeEndpoint):
    def __init__(self, log_level: str = "error", startup_timeout: float = 600.0, **server_args):
        if "port" not in server_args:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                server_args["port"] = s.getsockname()[1]
        server_args.setdefault("host", "127.0.0.1")
        cmd = [sys.executable, "-P", "-m", "arborlm.runtime.launch_server", "--log-level", log_level, *_flags(server_args)]
        self.proc = subprocess.Popen(cmd)
        self.url = f"http://{server_args['host']}:{server_args['port']}"
        super().__init__(self.url, api_key=server_args.get("api_key"))
        self.endpoint = self  # SGLang's flush_cache / get_server_info look here
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the arborlm server exited with status {self.proc.returncode} while starting")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.shutdown()
        raise RuntimeError(f"the arborlm server did not become healthy within {timeout:.0f} s")

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
