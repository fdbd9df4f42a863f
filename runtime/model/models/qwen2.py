"""Qwen2: Llama's stack with a bias on the q/k/v projections (found in the checkpoint)."""

from arborlm.runtime.model.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
