"""A start after a process was killed mid-build: a stale build lock, an abandoned build folder and a
cut-short library must not stop `Engine()` (torch's lock alone would make it wait forever)."""

from __future__ import annotations

import os
import subprocess
import sys

from arborlm.runtime.model.decode_graph import broken_object
from arborlm.runtime.model.layers import cpu_extension


def test_engine_starts_over_a_stale_lock_and_a_half_written_build(tmp_path, tiny_model_dir):
    real = cpu_extension.load_extension()  # a whole library to cut short
    name = cpu_extension.extension_name()
    cache = tmp_path / "xdg"
    d = cache / "arborlm" / "torch_extensions" / name
    d.mkdir(parents=True)
    (d / "lock").write_text("")  # torch's FileBaton, left by a killed in-place build
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = d / f"build-{int(dead.stdout)}-x"  # a private build folder whose process is gone
    abandoned.mkdir()
    (abandoned / "paged_attention.o").write_bytes(b"\0" * 100)
    (d / f"{name}.so").write_bytes(real.read_bytes()[:4096])  # half-written by an older build

    code = (f"from arborlm.runtime import Engine; e = Engine({tiny_model_dir!r}, dtype='float32'); "
            "out = e.generate('Hello', {'max_new_tokens': 4, 'temperature': 0}); "
            "print(out['meta_info']['completion_tokens']); e.shutdown()")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "4"
    assert not (d / "lock").exists() and not abandoned.exists()
    assert not broken_object(str(d / f"{name}.so"))
    assert [p.name for p in d.iterdir()] == [f"{name}.so"]  # no build folder left behind
