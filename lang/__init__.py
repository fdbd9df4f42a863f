"""arborlm's frontend language: SGLang's names, so `import arborlm.lang as sgl` runs SGLang programs."""

from arborlm.lang.api import (assistant, assistant_begin, assistant_end, flush_cache, function, gen, gen_int,
                              gen_string, get_server_info, image, select, separate_reasoning, set_default_backend,
                              system, system_begin, system_end, tools_prompt, user, user_begin, user_end, video)
from arborlm.lang.backend.base import Backend, BackendError
from arborlm.lang.choices import (greedy_token_selection, token_length_normalized,
                                  unconditional_likelihood_normalized)
from arborlm.lang.interpreter import ProgramError
from arborlm.lang.global_config import global_config
from arborlm.lang.state import ForkGroup, ProgramState

_LAZY = {  # these import torch or an HTTP client: only on first use
    "Engine": ("arborlm.runtime", "Engine"),
    "EngineBackend": ("arborlm.lang.backend.engine", "EngineBackend"),
    "RuntimeEndpoint": ("arborlm.lang.backend.runtime_endpoint", "RuntimeEndpoint"),
    "OpenAI": ("arborlm.lang.backend.openai", "OpenAI"),
    "Runtime": ("arborlm.lang.backend.runtime", "Runtime"),
    "ServerArgs": ("arborlm.runtime.server.args", "ServerArgs"),
}
# SGLang's other API clients: not provided (any OpenAI-compatible endpoint works through OpenAI)
_ABSENT = ("Anthropic", "LiteLLM", "VertexAI", "Crusoe")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _ABSENT:
        raise NotImplementedError(f"arborlm.lang.{name}: this backend is not provided; use arborlm.lang.OpenAI "
                                  "for any OpenAI-compatible endpoint, or RuntimeEndpoint / Engine")
    raise AttributeError(f"module 'arborlm.lang' has no attribute {name!r}")


__all__ = ["function", "gen", "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin",
           "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end", "set_default_backend",
           "flush_cache", "get_server_info", "tools_prompt", "image", "video", "separate_reasoning", "global_config",
           "Backend", "BackendError", "ProgramError", "ProgramState", "ForkGroup", "token_length_normalized",
           "greedy_token_selection", "unconditional_likelihood_normalized", *_LAZY]
