"""Our forward against transformers on tiny random-weight models (fast, float32)."""

import json
import os
import shutil

import pytest
import torch

from arborlm.runtime import Engine
from arborlm.runtime.errors import ModelLoadError, UnsupportedError
from arborlm.runtime.model import loader
from arborlm.runtime.model.execution import plan_execution

from conftest import assert_pool_clean, save_tiny_model

PROMPTS = [[1, 504, 3575, 282], list(range(100, 140)), [7] * 3, list(range(3000, 3017))]


def hf_greedy(path, ids, n):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=2)
        logits = m(torch.tensor([ids])).logits[0, -1]
    return out[0, len(ids):].tolist(), logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_transformers(arch, tmp_path, real_model_dir):
    extra = {"llama": {"tie_word_embeddings": False}, "qwen2": {"rope_theta": 500.0},
             "mistral": {"sliding_window": 4096}}[arch]
    path = save_tiny_model(str(tmp_path / arch), real_model_dir, arch=arch, seed=3, **extra)
    with Engine(path, dtype="float32", max_total_tokens=2048) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
        # logits of the first sampled token, via logprobs
        lp = eng.generate(input_ids=PROMPTS[1], sampling_params={"temperature": 0, "max_new_tokens": 1},
                          return_logprob=True, top_logprobs_num=5)
    for ids, out in zip(PROMPTS, outs):
        ref, _ = hf_greedy(path, ids, 24)
        assert out["output_ids"] == ref
    _, ref_logits = hf_greedy(path, PROMPTS[1], 1)
    ref_top = torch.log_softmax(ref_logits, -1).topk(5)
    ours = lp["meta_info"]["output_top_logprobs"][0]
    assert [t for _, t, _ in ours] == ref_top.indices.tolist()
    assert torch.allclose(torch.tensor([v for v, _, _ in ours]), ref_top.values, atol=1e-4)


def test_mistral_context_is_capped_at_its_sliding_window(tmp_path, real_model_dir):
    path = save_tiny_model(str(tmp_path / "mistral"), real_model_dir, arch="mistral", sliding_window=128)
    with Engine(path, dtype="float32", max_total_tokens=1024) as eng:
        assert eng.runner.context_length == 128
        assert type(eng.runner.model).__name__ == "MistralForCausalLM"


def test_chunked_prefill_and_batching_do_not_change_greedy_output(tiny_model_dir):
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=4096) as eng:
        alone = [eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in PROMPTS]
        batched = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=sp)]
        assert_pool_clean(eng)
    with Engine(tiny_model_dir, dtype="float32", max_total_tokens=4096, chunked_prefill_size=7) as eng:
        chunked = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=sp)]
        assert_pool_clean(eng)
    assert alone == batched == chunked


def test_bfloat16_runs_and_mostly_agrees(tiny_model_dir):
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    with Engine(tiny_model_dir, dtype="bfloat16", quantization="none", max_total_tokens=1024,
                compile_decode=False) as eng:
        out = eng.generate(input_ids=PROMPTS[1], sampling_params=sp)
        # AVX2-only CPUs compute in fp32 (activations, KV, dense weights)
        assert eng.runner.kv_pool.k_buffer.dtype == plan_execution(torch.bfloat16, None).act_dtype
        assert eng.runner.model.layers[0].qkv.form == "none"
    ref, _ = hf_greedy(tiny_model_dir, PROMPTS[1], 8)
    assert out["output_ids"][:2] == ref[:2]


def test_loader_errors_name_what_is_missing(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="neither a directory"):
        loader.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        loader.resolve_model(str(tmp_path / "x.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        loader.resolve_model(str(empty))
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        loader.resolve_model(str(noweights))
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        loader.resolve_model(str(gpt2))


def test_missing_weight_is_named(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    f = next(broken.glob("*.safetensors"))
    state = load_file(f)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, f)
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight"):
        Engine(str(broken), dtype="float32", max_total_tokens=256)


def test_engine_argument_errors(tiny_model_dir):
    with pytest.raises(TypeError, match="max_tokens_total"):
        Engine(tiny_model_dir, max_tokens_total=5)
    with pytest.raises(ValueError, match="dtype"):
        Engine(tiny_model_dir, dtype="int3")
    with pytest.raises(ValueError, match="json_max_depth"):
        Engine(tiny_model_dir, json_max_depth=-1)
