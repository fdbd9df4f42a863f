"""Compiled decode steps (one graph per batch-size bucket) on the tiny model: the same tokens as
eager decode, no recompile as contexts grow, and graphs saved for later processes."""

import pytest
import torch

from arborlm.runtime import Engine
from arborlm.runtime.model import decode_graph
from arborlm.runtime.model.decode_graph import BUCKETS, bucket_for

from conftest import assert_pool_clean


@pytest.fixture(autouse=True)
def graphs_root(tmp_path, monkeypatch):
    """Each test starts with no saved graphs (Inductor's own caches stay shared and warm)."""
    root = tmp_path / "decode_graphs"
    monkeypatch.setattr(decode_graph, "graphs_root", lambda: root)
    return root

PROMPTS = [[1, 504, 3575, 282], list(range(100, 140)), [7] * 3]


def test_buckets_cover_the_batch_sizes():
    assert bucket_for(1) == 1 and bucket_for(3) == 4 and bucket_for(33) == 48
    assert bucket_for(BUCKETS[-1] + 1) is None


def test_compiled_decode_matches_eager_and_never_recompiles(tiny_model_dir):
    import torch._dynamo

    sp = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=4096, compile_decode=False) as eng:
        eager_one = eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"]
        eager_batch = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=sp)]
    torch._dynamo.reset()
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=4096, compile_decode=True,
                compile_in_background=False) as eng:
        graphs = eng.runner.decode_graphs
        # bucket 1 compiles once (its warm-up and the serving calls share the guards: inference mode
        # included), then 200 growing decode steps of one request; any recompile raises
        from torch._dynamo.utils import counters

        one = eng.generate(input_ids=PROMPTS[1], sampling_params={**sp, "max_new_tokens": 2})["output_ids"]
        assert graphs.ready == {1} and set(graphs.graphs) == {1}, graphs.failed
        calls, graphs_before = graphs.calls, counters["stats"]["unique_graphs"]
        one = eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"]
        assert graphs.calls - calls == 199
        assert counters["stats"]["unique_graphs"] == graphs_before  # 199 growing steps, nothing traced again
        batch = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=sp)]
        assert 4 in graphs.ready and not graphs.failed  # 3 rows run padded to the bucket of 4
        assert set(graphs.graphs) == {1, 4} and set(graphs.compile_seconds) == {1, 4}  # one graph per bucket
        assert_pool_clean(eng)
    assert one == eager_one
    assert batch == eager_batch


def test_background_compile_serves_eagerly_meanwhile(tiny_model_dir, graphs_root):
    """The default: a compile worker process compiles and saves the bucket, this one loads it."""
    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048, compile_decode=True) as eng:
        first = eng.generate(input_ids=PROMPTS[0], sampling_params=sp)["output_ids"]
        eng.runner.decode_graphs.wait(timeout=300)
        assert 1 in eng.runner.decode_graphs.ready and eng.runner.decode_graphs.loaded == {1}
        assert list(graphs_root.glob("*/bs1.pt2"))
        again = eng.generate(input_ids=PROMPTS[0], sampling_params=sp)["output_ids"]
        assert_pool_clean(eng)
    assert first == again


def test_background_compiles_go_past_dynamos_default_limit(tiny_model_dir):
    """More than Dynamo's default recompile limit (8) of buckets compile: each is its own
    ahead-of-time capture, which that limit does not count (a heavy mixed load reaches them)."""
    from arborlm.runtime.model.decode_graph import BUCKETS

    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048, compile_decode=True) as eng:
        graphs = eng.runner.decode_graphs
        for b in BUCKETS[:10]:
            graphs.available(b)
            graphs.wait(timeout=300)
        assert not graphs.failed and set(BUCKETS[:10]) <= graphs.ready


def test_a_cut_short_kernel_is_detected(tmp_path):
    """A compiled kernel left empty or truncated by a killed compile is told from a whole one."""
    import os

    from arborlm.runtime.model.decode_graph import broken_object

    whole = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    data = open(whole, "rb").read()
    (tmp_path / "empty.so").write_bytes(b"")
    (tmp_path / "text.so").write_bytes(b"not an ELF file" * 10)
    (tmp_path / "cut.so").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.so").write_bytes(data)
    assert [broken_object(str(tmp_path / f"{n}.so")) for n in ("empty", "text", "cut", "whole")] == [True, True, True, False]


def test_warm_up_compiles_before_serving_and_recovers_a_cut_short_kernel(tiny_model_dir, tmp_path):
    """--warmup-decode-bs compiles the buckets of batches up to it before the first request. A load
    that fails on a cut-short kernel (Inductor reuses any file at the kernel's path) deletes that
    file and compiles once more, instead of leaving the bucket eager in every later process."""
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=2048, compile_decode=True,
                warmup_decode_bs=2, compile_worker=False) as eng:  # later compiles on a thread, here
        graphs = eng.runner.decode_graphs
        assert graphs.ready == {1, 2} and not graphs.compiling and not graphs.failed
        assert graphs.state() == {"ready": [1, 2], "loaded": [], "compiling": [], "failed": []}

        cut = tmp_path / "kernel.main.so"
        cut.write_bytes(b"")
        calls = []

        class Compiled:  # stands in for a compiled step whose first call loads its kernel
            def __init__(self, error: str, fails: int):
                self.error, self.fails = error, fails

            def __call__(self, *args):
                calls.append(len(args[1]))  # args[0] is the model, args[1] the input ids
                if len(calls) <= self.fails:
                    raise ImportError(self.error)

            def disable_guard_check(self):
                pass

            def save_compiled_function(self, path):
                open(path, "wb").close()

        graphs.aot_compile = lambda args: Compiled(f"{cut}: file too short", fails=1)
        graphs.available(16)
        graphs.wait(timeout=60)
        assert calls == [16, 16] and not cut.exists()
        assert 16 in graphs.ready and not graphs.failed

        # any other failure leaves the bucket eager, once
        graphs.aot_compile = lambda args: Compiled(f"{tmp_path / 'missing.so'}: cannot open shared object file", fails=99)
        graphs.available(24)
        graphs.wait(timeout=60)
        assert "ImportError" in graphs.failed[24] and 24 not in graphs.ready


def test_a_later_process_loads_the_saved_graphs_before_serving(tiny_model_dir, graphs_root):
    """A bucket compiled once is saved; the next engine (a new process, as far as the graphs know)
    loads it before its first request, decodes the same tokens through it, and compiles nothing.
    A damaged saved graph is removed and compiled again on first use."""
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    kw = dict(dtype="float32", max_total_tokens=2048, compile_decode=True)
    with Engine(tiny_model_dir, warmup_decode_bs=1, **kw) as eng:
        first = eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"]
    (saved,) = graphs_root.glob("*/bs1.pt2")
    torch._dynamo.reset()
    with Engine(tiny_model_dir, **kw) as eng:
        graphs = eng.runner.decode_graphs
        assert graphs.state() == {"ready": [1], "loaded": [1], "compiling": [], "failed": []}
        again = eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"]
        assert graphs.calls == 39 and not graphs.compile_seconds
    assert again == first
    saved.write_bytes(saved.read_bytes()[:1000])  # cut short
    with Engine(tiny_model_dir, **kw, compile_in_background=False) as eng:
        graphs = eng.runner.decode_graphs
        assert not graphs.loaded and not saved.exists()
        assert eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"] == first
        assert 1 in graphs.compile_seconds and saved.exists()
