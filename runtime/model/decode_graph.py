"""Decode steps as compiled graphs, one per batch-size bucket.

Eager decode of a 30-layer model dispatches ~1,000 small ops per step from Python, which on a
2-core CPU costs as much as the matmuls. `torch.compile` (Inductor's C++ backend) fuses the
elementwise work into a few C++ loops and calls the matmul kernels directly. Attention and
the KV write are opaque custom ops (layers/paged_attention.py) over fixed-shape tensors, so a
graph depends on the batch size alone and never recompiles as contexts grow. A batch is padded
up to its bucket; pad rows repeat row 0 and write their K/V to the padding slot 0.

Each bucket is compiled ahead of time (`torch.compile(...).aot_compile`) and saved under the
arborlm cache, keyed by everything the graph depends on (torch, this package's model code, the
model's config, execution plan and buffer shapes, the KV pool's shape, the CPU): a later process
loads it before it serves (~2 s for the first, a fraction of that for the others) instead of
tracing the model again with Dynamo (measured 11-16 s per bucket on 2 cores even with Inductor's
caches warm, all of it holding the GIL the serving thread needs). The saved graph keeps no guards:
the key, not Dynamo, says when it applies, and __call__ always passes the bucket's shapes.

A bucket no process has compiled yet compiles on a background thread the first time it is needed,
and decode runs eagerly until it is ready; --warmup-decode-bs compiles the small ones before
serving instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from arborlm.runtime.model.execution import cpu_flags
from arborlm.runtime.model.loader import cache_root

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_for(n: int) -> int | None:
    return next((b for b in BUCKETS if b >= n), None)


def _configure_inductor() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root(), "inductor"))
    import torch._inductor.config as inductor

    # No freezing: it would fold a prepacked copy of every dense weight into each bucket's graph
    # (measured: +550 MB of RSS per batched bucket on the 135M model).
    inductor.freezing = False


def broken_object(path: str) -> bool:
    """Whether a compiled kernel (.so) is cut short: empty, not ELF, or missing the section headers
    an ELF file keeps at its end."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 2: a 64-bit ELF
        return True
    order = "<" if head[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", head, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", head, 0x3A)
    return shoff + shentsize * shnum > size


def remove_broken_object(error: BaseException) -> str | None:
    """Delete the cut-short kernel a failed load names, so the next compile rebuilds it.

    Inductor writes a kernel's .so in place and reuses any file at that path. A process killed while
    compiling (a server stopped during its first requests) can leave it empty, and every later
    process then fails that batch size's graph ("file too short") and decodes eagerly for good."""
    for path in re.findall(r"(/[^\s:'\"]+\.so)\b", str(error)):
        if os.path.isfile(path) and broken_object(path):
            os.remove(path)
            return path
    return None


def decode_step(model, *args) -> torch.Tensor:
    """What a saved graph captures: the model is an input (its weights are not saved with it)."""
    return model.decode(*args)


def graphs_root() -> Path:
    return Path(cache_root()) / "decode_graphs"


def graphs_key(model, kv_pool, req_to_token: torch.Tensor) -> str:
    """Everything a compiled decode graph depends on; a saved one is loaded only under its key."""
    h = hashlib.sha256()
    code = Path(__file__).resolve().parent  # runtime/model: the model code a graph is traced from
    for f in sorted(code.rglob("*.py")) + sorted(code.rglob("*.cpp")):
        h.update(f.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(sorted(cpu_flags())).encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(repr(model.plan).encode())
    for name, t in model.named_buffers():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    for t in (kv_pool.k_buffer, kv_pool.v_buffer, req_to_token):
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()[:16]


_CLOSED = object()  # worker_args after close(): no new worker starts
_worker_lock = threading.Lock()  # one compile worker at a time: each holds a copy of the model


class DecodeGraphs:
    def __init__(self, model, kv_pool, req_to_token: torch.Tensor, background: bool = True, worker_args=None):
        """`worker_args` (the EngineArgs that built this model): background compiles run in a
        compile worker process (compile_worker.py); None: on a thread of this process."""
        from arborlm.runtime.model.layers.paged_attention import load_extension

        load_extension()  # the ops' CPU kernels must be registered before a graph is traced
        _configure_inductor()
        self.model, self.kv_pool, self.req_to_token = model, kv_pool, req_to_token
        self.dir = graphs_root() / graphs_key(model, kv_pool, req_to_token)
        self.background, self.worker_args = background, worker_args
        self.worker: subprocess.Popen | None = None
        self.graphs: dict[int, object] = {}  # bucket -> its compiled step
        self.ready: set[int] = set()
        self.loaded: set[int] = set()  # of those, the ones a saved graph served
        self.compiling: set[int] = set()
        self.failed: dict[int, str] = {}
        self.compile_seconds: dict[int, float] = {}
        self.calls = 0  # steps run through a compiled graph
        self._lock = threading.Lock()

    def load_saved(self, max_bs: int) -> list[int]:
        """Load the graphs earlier processes compiled, for batches up to max_bs. Returns the buckets."""
        top = bucket_for(max_bs) or BUCKETS[-1]
        for b in BUCKETS:
            if b <= top and b not in self.ready and self.saved(b) and self._load(b):
                self.ready.add(b)
        return sorted(self.loaded)

    def saved(self, b: int) -> bool:
        return self._path(b).is_file()

    def _load(self, b: int) -> bool:
        path = self._path(b)
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001  a stale or damaged file: compile it again when needed
            logger.warning("saved decode graph %s could not be loaded (%s: %s); removed", path, type(e).__name__, e)
            remove_broken_object(e)
            path.unlink(missing_ok=True)
            return False
        self.graphs[b] = fn
        self.loaded.add(b)
        return True

    def _path(self, b: int) -> Path:
        return self.dir / f"bs{b}.pt2"

    def available(self, n: int) -> bool:
        """Whether a compiled graph serves n rows now; otherwise start compiling its bucket."""
        b = bucket_for(n)
        if b is None or b in self.failed:
            return False
        if b in self.ready:
            return True
        with self._lock:
            if b in self.compiling:
                return False
            self.compiling.add(b)
        if self.background:
            # Not a daemon: a process exiting mid-compile joins this thread (Inductor, refusing new work
            # at shutdown, gives up cleanly) instead of killing it inside native code, which aborted
            # the process ("terminate called without an active exception").
            target = self._warm if self.worker_args is None else self._warm_in_worker
            threading.Thread(target=target, args=(b,), name=f"arborlm-compile-{b}", daemon=False).start()
            return False
        self._warm(b)
        return b in self.ready

    def warm_up(self, max_bs: int) -> None:
        """Compile every bucket a batch of up to max_bs rows uses, here and now (before serving:
        a compile on the serving process holds the GIL for seconds at a time and slows every step)."""
        top = bucket_for(max_bs) or BUCKETS[-1]
        for b in BUCKETS:
            if max_bs <= 0 or b > top:
                break
            if b not in self.ready and b not in self.failed:
                self.compiling.add(b)
                self._warm(b)

    def state(self) -> dict:
        return {"ready": sorted(self.ready), "loaded": sorted(self.loaded), "compiling": sorted(self.compiling),
                "failed": sorted(self.failed)}

    def wait(self, timeout: float | None = None) -> None:
        """Block until no bucket is compiling (tests, benchmarks)."""
        t0 = time.monotonic()
        while self.compiling and (timeout is None or time.monotonic() - t0 < timeout):
            time.sleep(0.05)

    def _warm(self, b: int) -> None:
        t0 = time.perf_counter()
        try:
            for attempt in (1, 2):
                try:
                    self._compile(b)
                except Exception as e:  # noqa: BLE001  a graph that cannot compile leaves that bucket eager
                    removed = remove_broken_object(e) if attempt == 1 else None
                    if removed:
                        logger.warning("decode graph for batch %d: removed a cut-short compiled kernel %s; "
                                       "compiling again", b, removed)
                        continue
                    self.failed[b] = f"{type(e).__name__}: {e}"
                    if "interpreter shutdown" not in str(e):  # a process exiting mid-compile: expected, not news
                        logger.warning("decode graph for batch %d failed to compile, staying eager: %s",
                                       b, self.failed[b])
                    return
                self.compile_seconds[b] = time.perf_counter() - t0
                self.ready.add(b)
                logger.info("decode graph for batch %d ready in %.1fs", b, self.compile_seconds[b])
                return
        finally:
            self.compiling.discard(b)

    def _warm_in_worker(self, b: int) -> None:
        """Have a compile worker compile and save bucket b, then load it (this thread waits, the
        serving thread decodes eagerly meanwhile)."""
        t0 = time.perf_counter()
        try:
            with _worker_lock:
                if not self.saved(b):  # else another engine's worker saved it meanwhile
                    if self.worker_args is _CLOSED:
                        return
                    from arborlm.runtime.model.compile_worker import idle_priority

                    self.worker = subprocess.Popen([sys.executable, "-P", "-m", "arborlm.runtime.model.compile_worker"],
                                                   stdin=subprocess.PIPE, preexec_fn=idle_priority)
                    self.worker.communicate(pickle.dumps((self.worker_args, b, str(self.dir.parent))))
                    code, self.worker = self.worker.returncode, None
                    if code != 0:
                        self.failed[b] = f"the compile worker exited with code {code}"
                        if code > 0:  # < 0: killed (this engine closing), not news
                            logger.warning("decode graph for batch %d: %s; staying eager", b, self.failed[b])
                        return
            if self._load(b):
                self.compile_seconds[b] = time.perf_counter() - t0
                self.ready.add(b)
                logger.info("decode graph for batch %d ready in %.1fs (compile worker)", b, self.compile_seconds[b])
            else:
                self.failed[b] = "the compile worker's graph did not load"
        finally:
            self.compiling.discard(b)

    def close(self) -> None:
        """Stop a running compile worker (the engine is shutting down)."""
        self.worker_args = _CLOSED
        worker = self.worker
        if worker is not None and worker.poll() is None:
            worker.kill()

    def _compile(self, b: int) -> None:
        with torch.inference_mode():
            # Distinct inference tensors, as __call__ passes. Tracing runs the step once: it writes
            # only to the padding slot 0 and reads slot table[0, 0].
            ids, pos, slots, rows = (torch.zeros(b, dtype=torch.int64) for _ in range(4))
            args = (self.model, ids, pos, slots, self.kv_pool.k_buffer, self.kv_pool.v_buffer, self.req_to_token,
                    rows, torch.ones(b, dtype=torch.int64), torch.zeros((), dtype=torch.int64))
            fn = self.aot_compile(args)
            fn(*args)  # the first call loads the kernels: a broken one fails here, in the compile thread
        fn.disable_guard_check()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fn.save_compiled_function(str(self._path(b)))  # written whole or not at all (a rename)
        except Exception as e:  # noqa: BLE001  not saved: this process still has it
            logger.warning("decode graph for batch %d not saved (%s: %s)", b, type(e).__name__, e)
        self.graphs[b] = fn

    @staticmethod
    def aot_compile(args: tuple):
        """A guard-free compiled decode step for these example inputs (the key stands for the guards)."""
        step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
        return step.aot_compile((args, {}))

    def __call__(self, input_ids, positions, out_slots, rows, seq_lens, prefix_len: int) -> torch.Tensor:
        n = input_ids.numel()
        b = bucket_for(n)
        self.calls += 1
        if b != n:
            pad = b - n

            def padded(t, fill):
                return torch.cat([t, fill.expand(pad)])

            input_ids = padded(input_ids, input_ids[:1])
            positions = padded(positions, positions[:1])
            out_slots = padded(out_slots, torch.zeros(1, dtype=out_slots.dtype))
            rows, seq_lens = padded(rows, rows[:1]), padded(seq_lens, seq_lens[:1])
        # As in _warm: inference mode, and the small inputs as inference tensors. Grad mode and each
        # tensor's dispatch keys are part of the graph's guards, so anything else would recompile the
        # bucket on the serving thread (and count towards Dynamo's recompile limit).
        with torch.inference_mode():
            small = [t if t.is_inference() else t.clone() for t in (input_ids, positions, out_slots, rows, seq_lens)]
            input_ids, positions, out_slots, rows, seq_lens = small
            logits = self.graphs[b](self.model, input_ids, positions, out_slots, self.kv_pool.k_buffer,
                                    self.kv_pool.v_buffer, self.req_to_token, rows, seq_lens,
                                    torch.tensor(prefix_len, dtype=torch.int64))
        return logits[:n]
