#!/usr/bin/env python
"""Run SGLang's own frontend test programs on arborlm.lang with only their imports changed.

Reads `sglang/test/test_programs.py` from a path you give (it ships in the sglang wheel; nothing of
SGLang is imported or vendored here), rewrites its import lines (`import sglang as sgl` ->
`import arborlm.lang as sgl`, `from sglang.lang.ir import ...` -> `from arborlm.lang.ir import ...`,
and SGLang's `is_hip` probe -> False), and runs the same programs as run_sglang_programs.py on
arborlm's RuntimeEndpoint (URL) or, with `--engine`, an in-process Engine:

    python examples/sglang_client/run_programs_on_arborlm.py /path/to/sglang/test/test_programs.py http://127.0.0.1:30000
    python examples/sglang_client/run_programs_on_arborlm.py /path/to/test_programs.py --engine
"""

from __future__ import annotations

import re
import sys
import types

from _report import run_and_report

IMPORTS = [
    (r"^(\s*)import sglang as sgl$", r"\1import arborlm.lang as sgl"),
    (r"^(\s*)from sglang\.lang\.ir import", r"\1from arborlm.lang.ir import"),
    (r"^(\s*)from sglang\.srt\.utils import is_hip$", r"\1is_hip = lambda: False"),
]
PROGRAMS = ["few_shot_qa", "mt_bench", ("select", False), "decode_int", "decode_json_regex", "decode_json",
            "expert_answer", "tool_use", "react", "parallel_decoding", "parallel_encoding", "stream",
            "stream_logprobs", "regex", "dtype_gen"]


def load(path: str) -> types.ModuleType:
    src = open(path).read()
    for pattern, repl in IMPORTS:
        src = re.sub(pattern, repl, src, flags=re.M)
    module = types.ModuleType("sglang_test_programs_on_arborlm")
    exec(compile(src, path, "exec"), module.__dict__)
    return module


def main() -> int:
    import arborlm.lang as sgl

    path, target = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "--engine"
    if target == "--engine":
        sgl.set_default_backend(sgl.Engine())
    else:
        sgl.set_default_backend(sgl.RuntimeEndpoint(target))
    tp = load(path)
    programs = []
    for entry in PROGRAMS:
        name, args = (entry, ()) if isinstance(entry, str) else (entry[0], entry[1:])
        programs.append((name, getattr(tp, "test_" + name), args))
    return run_and_report(programs)


if __name__ == "__main__":
    sys.exit(main())
