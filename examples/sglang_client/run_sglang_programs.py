#!/usr/bin/env python
"""Run SGLang's own frontend test programs (`sglang.test.test_programs` of the installed sglang
wheel), unchanged, with SGLang's own client (`sgl.RuntimeEndpoint`) against an arborlm server.

Run it with a Python that has sglang installed (e.g. `pip install --no-deps sglang==0.5.23` plus
the packages its import needs; docs/sglang_compat.md lists them), not arborlm's venv:

    arborlm serve --port 30000 &                      # or: make serve
    python examples/sglang_client/run_sglang_programs.py http://127.0.0.1:30000

Each program ends as `ok`, `wrong answer` (its own assertion on the model's answer failed: the
135M embedded model gets many of them wrong; that is not a protocol error) or `error` (anything
else: an HTTP error, a missing field, a crash in the client). Exits 1 if any program errored.
Programs that need an image model, an OpenAI account or API speculative execution are skipped.
"""

from __future__ import annotations

import sys

import sglang as sgl
from sglang.test import test_programs as tp

from _report import run_and_report

PROGRAMS = [
    ("few_shot_qa", tp.test_few_shot_qa, ()),
    ("mt_bench", tp.test_mt_bench, ()),
    ("select", tp.test_select, (False,)),
    ("decode_int", tp.test_decode_int, ()),
    ("decode_json_regex", tp.test_decode_json_regex, ()),
    ("decode_json", tp.test_decode_json, ()),
    ("expert_answer", tp.test_expert_answer, ()),
    ("tool_use", tp.test_tool_use, ()),
    ("react", tp.test_react, ()),
    ("parallel_decoding", tp.test_parallel_decoding, ()),
    ("parallel_encoding", tp.test_parallel_encoding, ()),
    ("stream", tp.test_stream, ()),
    ("stream_logprobs", tp.test_stream_logprobs, ()),
    ("regex", tp.test_regex, ()),
    ("dtype_gen", tp.test_dtype_gen, ()),
]


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:30000"
    sgl.set_default_backend(sgl.RuntimeEndpoint(url, chat_template_name="chatml"))
    return run_and_report(PROGRAMS)


if __name__ == "__main__":
    sys.exit(main())
