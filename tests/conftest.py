"""Shared fixtures: one real-model engine per session, and a tiny random-weight Llama for unit tests."""

from __future__ import annotations

import os
import shutil
import sys

# The repository root must not be importable as a path: its kernels/ folder (arborlm.kernels, mapped
# by the package's install) would shadow Hugging Face's `kernels` package, which transformers imports.
# `make test` runs `python -P -m pytest`; this covers a plain `python -m pytest` from the root (the
# servers tests start run with -P too; scripts need their own folder on the path, so no PYTHONSAFEPATH).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton picks its CPU interpreter when a kernel is defined, so this must precede any import of
    # arborlm.kernels by a test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from arborlm.runtime.model import loader  # noqa: E402


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF directory (converted from GGUF once)."""
    return loader.resolve_model(None).model_dir


@pytest.fixture(scope="session")
def tokenizer(real_model_dir):
    return loader.load_tokenizer(real_model_dir)


def save_tiny_model(path: str, tokenizer_dir: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """A random-weight model with the real tokenizer (so text round-trips), small enough to be fast."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cfg_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    kwargs = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg_cls(**kwargs), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    for f in os.listdir(tokenizer_dir):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tokenizer_dir, f), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), real_model_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from arborlm.runtime import Engine

    engine = Engine(tiny_model_dir, dtype="float32", max_total_tokens=4096, max_running_requests=32)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def engine(real_model_dir):
    """The real model in float32 (the precision the transformers reference comparisons need)."""
    from arborlm.runtime import Engine

    engine = Engine(dtype="float32", max_total_tokens=16384, max_running_requests=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def hf_model(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


def assert_pool_clean(engine) -> None:
    """Once all requests have ended, every KV slot is free or cached, and every request row is free."""
    import time

    deadline = time.time() + 5
    while engine.scheduler.has_work() and time.time() < deadline:
        time.sleep(0.01)
    pool, tree = engine.runner.kv_pool, engine.scheduler.tree
    assert tree.protected_size == 0
    assert pool.available() + tree.evictable_size == pool.size
    assert int(pool.allocator.is_free.sum()) == pool.available()
    assert tree.evictable_size == tree.total_size()
    assert engine.runner.req_pool.available() == engine.runner.req_pool.max_requests


# ---- a live server ------------------------------------------------------------------------------
API_KEY = "test-key"


class LiveServer:
    """A server subprocess on a free loopback port; `url` once /health answers 200."""

    def __init__(self, *args: str, log_path: str, new_session: bool = False):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "arborlm.runtime.launch_server", "--port", str(self.port),
                                      "--log-level", "warning", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)  # its own process group, to signal whole

    def wait_healthy(self, timeout: float = 240) -> "LiveServer":
        import time

        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{open(self.log_path).read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy in {timeout}s:\n{open(self.log_path).read()[-3000:]}")

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains: running requests get --shutdown-timeout (30 s)
            self.proc.wait(timeout=60)
        self.log.close()


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is pid (from /proc, Linux)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


@pytest.fixture(scope="session")
def server(real_model_dir, tmp_path_factory):
    """The real model served in float32 with an API key (the same settings as the `engine` fixture)."""
    srv = LiveServer("--dtype", "float32", "--max-total-tokens", "16384", "--max-running-requests", "128",
                     "--api-key", API_KEY, log_path=str(tmp_path_factory.mktemp("server") / "server.log"))
    try:
        yield srv.wait_healthy()
    finally:
        srv.stop()
