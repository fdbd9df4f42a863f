"""arborlm's C++ CPU kernels: one extension (csrc/*.cpp), built at first use, and the schemas of its ops.

The extension is compiled at first use (JIT, ~30 s on 2 cores) into the user cache, with
-march=native; its directory name hashes the sources, the flags, the CPU's feature flags and the
torch version, so an edit, another CPU or another torch rebuilds and a cached build is reused.
A build runs in a folder of its own and its library is renamed into place, so a process killed
mid-build leaves nothing a later start waits on (torch's build lock has no timeout and no owner
check) or loads half-written.
The ops (namespace `arborlm`) are declared here with fake kernels, so tracing never needs the build;
paged_attention.py, fused_cpu.py and int8_group.py hold their Python wrappers and torch references.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from arborlm.runtime.model.execution import cpu_flags
from arborlm.runtime.model.loader import cache_root

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "paged_attention.cpp", _CSRC / "elementwise.cpp", _CSRC / "int8_linear.cpp"]
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
_lock = threading.Lock()
_ext = None
logger = logging.getLogger(__name__)


def build_dir(name: str) -> Path:
    return Path(cache_root()) / "torch_extensions" / name


def load_extension() -> Path:
    """Build the extension (first time for this source, CPU and torch) and load it, registering the
    ops' CPU kernels; once per process. Call it before torch.compile traces the ops (the backend's
    constructor does). Returns the library's path."""
    global _ext
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        _ext = _load_or_build(extension_name())
    return _ext


def extension_name() -> str:
    # -march=native code runs only on a CPU with the same flags: they are part of the key
    key = b"".join(p.read_bytes() for p in _SOURCES) + " ".join(_CFLAGS).encode()
    key += " ".join(sorted(cpu_flags())).encode() + torch.__version__.encode()
    return "arborlm_cpu_" + hashlib.sha256(key).hexdigest()[:12]


def _load_or_build(name: str) -> Path:
    """Load the cached library, or build it in a private folder and rename it into place."""
    from arborlm.runtime.model.decode_graph import broken_object

    d = build_dir(name)
    lib = d / f"{name}.so"
    if lib.is_file() and broken_object(str(lib)):  # cut short by an older, in-place build
        logger.warning("removing a cut-short CPU kernel library %s; building it again", lib)
        lib.unlink()
    if lib.is_file():
        torch.ops.load_library(str(lib))
        return lib
    _check_toolchain()
    d.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(d)
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=d))
    try:
        from torch.utils import cpp_extension

        logger.info("building arborlm's CPU kernels (once per CPU and torch version, ~30 s) in %s", tmp)
        # the library loads from tmp; the rename keeps the mapped file, so the process goes on using it
        cpp_extension.load(
            name=name, sources=[str(p) for p in _SOURCES], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(tmp), is_python_module=False, verbose=False,
        )
        os.replace(tmp / f"{name}.so", lib)  # atomic: a concurrent build's identical library may win
    except Exception as e:  # ninja missing, compiler error: say what was being built and where
        raise RuntimeError(
            f"building the CPU kernels ({', '.join(p.name for p in _SOURCES)} in {tmp}) failed: {e}. It needs a C++17 "
            "compiler with OpenMP (g++ or clang++) and ninja (pip install ninja); attention_backend='torch' "
            "does without them"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _check_toolchain() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"arborlm's CPU kernels are compiled at first use and need a C++ compiler ({cxx!r} not found; "
            "install g++ or clang++, or set CXX), or use attention_backend='torch'"
        )
    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) puts its binary beside it
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _remove_abandoned_builds(d: Path) -> None:
    """Delete build folders whose process is gone, and the lock an older in-place build left."""
    (d / "lock").unlink(missing_ok=True)  # torch's FileBaton, from builds before private folders
    for p in d.glob("build-*-*"):
        try:
            pid = int(p.name.split("-")[1])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Custom ops. The schemas and fake kernels live here (so tracing never needs the build); the C++
# extension registers the CPU kernels when it is loaded. Defining them with torch.library directly,
# rather than wrapping Python functions with @torch.library.custom_op, keeps an eager call a single
# C++ dispatch: the wrapper costs ~5 us a call, ~15 us for the mutating kv_write, which times two ops
# and 30 layers is more than the attention itself at short contexts.

_lib = torch.library.Library("arborlm", "FRAGMENT")
_lib.define(
    "decode_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, int layer, Tensor req_to_token, "
    "Tensor req_rows, Tensor seq_lens, Tensor prefix_len, float scale) -> Tensor"
)
_lib.define(
    "extend_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, int layer, Tensor req_to_token, int req_row, "
    "int prefix_len, float scale) -> Tensor"
)
_lib.define("kv_write(Tensor(a!) k_buffer, Tensor(b!) v_buffer, int layer, Tensor slots, Tensor k, Tensor v) -> ()")


@torch.library.register_fake("arborlm::decode_attention", lib=_lib)
def _(q, k_buffer, v_buffer, layer, req_to_token, req_rows, seq_lens, prefix_len, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("arborlm::extend_attention", lib=_lib)
def _(q, k_buffer, v_buffer, layer, req_to_token, req_row, prefix_len, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("arborlm::kv_write", lib=_lib)
def _(k_buffer, v_buffer, layer, slots, k, v):
    return None


_lib.define("rmsnorm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor, Tensor)")
_lib.define("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions) -> ()")
_lib.define("silu_and_mul(Tensor x) -> Tensor")


@torch.library.register_fake("arborlm::rmsnorm", lib=_lib)
def _(x, weight, eps, residual=None):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("arborlm::rope_", lib=_lib)
def _(q, k, cos, sin, positions):
    return None


@torch.library.register_fake("arborlm::silu_and_mul", lib=_lib)
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


# y [B, N] float32 = x [B, K] @ (qweight int8 [N, K] * scales float32 [N, K/32], per group of 32).T
_lib.define("int8_group_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor")


@torch.library.register_fake("arborlm::int8_group_linear", lib=_lib)
def _(x, qweight, scales):
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)
