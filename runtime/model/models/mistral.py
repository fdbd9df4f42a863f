"""Mistral: Llama's stack; a `sliding_window` shorter than the context caps the context at the
window (registry.context_limit), since full attention past it would not be Mistral's."""

from arborlm.runtime.model.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
