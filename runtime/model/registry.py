"""From an HF config's `architectures` (or `model_type`) to the model class that runs it.
Adding a Llama-like architecture is a small file in models/ and one line here."""

from __future__ import annotations

from arborlm.runtime.errors import UnsupportedError
from arborlm.runtime.model.models.llama import LlamaForCausalLM
from arborlm.runtime.model.models.mistral import MistralForCausalLM
from arborlm.runtime.model.models.qwen2 import Qwen2ForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def architecture_of(cfg: dict) -> str:
    """The first supported name of config.json's `architectures` (or its `model_type`)."""
    archs = cfg.get("architectures") or [_BY_MODEL_TYPE.get(cfg.get("model_type"), "")]
    for a in archs:
        if a in MODELS:
            return a
    raise UnsupportedError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                           f"supported: {', '.join(MODELS)}")


def model_class(config) -> type[LlamaForCausalLM]:
    return MODELS[architecture_of(config.to_dict())]


def context_limit(config) -> int:
    """The longest context the model class runs exactly (Mistral: its sliding window, if shorter)."""
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None) if model_class(config) is MistralForCausalLM else None
    return min(limit, window) if window else limit
