"""The default fast path on the real model (bf16, int4 layer weights, compiled decode) against
transformers in float32 on the same dequantised GGUF values: a measured greedy agreement.

Greedy decoding amplifies any numeric change: once one token differs the rest follow another
path. So the figure is the share of positions, over a fixed prompt set, at which the two token
sequences agree before their first difference (docs/benchmarks.md states the measured value).
"""

import pytest
import torch

from arborlm.runtime import Engine

from conftest import assert_pool_clean

pytestmark = pytest.mark.integration

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
    "The three most important inventions of the 20th century are",
    "Water boils at",
    "The best way to learn a new language is",
    "import numpy as np\n\n",
    "Dear customer, thank you for",
    "The capital of Australia is",
    "In 1969, the first humans",
    "A healthy breakfast usually includes",
]
NEW = 32
# Measured on this prompt set (docs/benchmarks.md); the floor leaves room for CPU differences.
MIN_AGREEMENT = 0.5


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_int4_compiled_default_agrees_with_transformers(hf_model, tokenizer):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    with torch.no_grad():
        ref = [hf_model.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                 max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=2)[0, len(i):].tolist()
               for i in ids]
    sp = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
    with Engine(max_total_tokens=4096, compile_in_background=False) as eng:  # the defaults: bf16, int4, compiled
        assert eng.runner.plan.quantization == "int4" and eng.runner.decode_graphs is not None
        outs = [eng.generate(input_ids=i, sampling_params=sp)["output_ids"] for i in ids]
        assert eng.runner.decode_graphs.calls >= len(ids) * (NEW - 1)
        assert_pool_clean(eng)
    share = sum(agreement(o, r) for o, r in zip(outs, ref)) / (NEW * len(ids))
    print(f"int4 + bf16 greedy agreement with transformers fp32: {share:.1%}")
    assert share >= MIN_AGREEMENT
