"""Every lang example runs on the embedded model (json_extraction, which needs json_schema
support, is run in test_lang_constrained.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def load(name):
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def test_quickstart_runs_with_one_command():
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "lang_quickstart.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


def test_chat(engine):
    state = load("chat").main(engine)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]


def test_fewshot_classification(engine):
    states = load("fewshot_classification").main(engine)
    labels = [s["label"] for s in states]
    assert set(labels) <= {"positive", "negative"} and len(labels) == 6


def test_tree_of_thought(engine):
    state = load("tree_of_thought").main(engine)
    assert len(state["thought"]) == 3 and state["best"] in {"1", "2", "3"}


def test_react_tools(engine):
    state = load("react_tools").main(engine)
    assert state.error() is None and state["answer"]
