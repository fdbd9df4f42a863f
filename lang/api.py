"""The public DSL functions, named as in SGLang's frontend (`import arborlm.lang as sgl`)."""

from __future__ import annotations

import json
import re
import warnings

from arborlm.lang import choices as _choices
from arborlm.lang import ir
from arborlm.lang.program import Function


def function(func=None, *, num_api_spec_tokens=None):
    """Decorator: a program whose first parameter is the state `s`.

    `num_api_spec_tokens` (SGLang's speculative execution for API models: one long call whose output
    is cut into several `gen`s) is not implemented; rather than ignore it, it is refused."""
    if num_api_spec_tokens is not None:
        raise NotImplementedError(
            "function(num_api_spec_tokens=...): API speculative execution is not supported by arborlm.lang; "
            "remove the argument (each gen then makes its own call)")
    if func is None:
        return lambda f: Function(f)
    return Function(func)


def set_default_backend(backend) -> None:
    """Programs run on `backend` (a Backend or an arborlm Engine) unless run(backend=...) says otherwise."""
    from arborlm.lang import backend as _backend

    _backend.set_default_backend(backend)


def flush_cache(backend=None) -> bool:
    """Empty the prefix cache of `backend` (default: the default backend); False while requests run,
    or when there is no backend (as in SGLang)."""
    from arborlm.lang import backend as _backend, loop

    if backend is None and _backend._default is None:
        return False
    return loop.run_sync(_backend.resolve(backend).flush_cache())


def get_server_info(backend=None) -> dict | None:
    """The settings and scheduler counters of `backend` (default: the default backend; None without one)."""
    from arborlm.lang import backend as _backend, loop

    if backend is None and _backend._default is None:
        return None
    return loop.run_sync(_backend.resolve(backend).server_info())


def image(path):
    """SGLang's image input: arborlm serves text-only models, so this is refused where it is written."""
    raise NotImplementedError(f"image({path!r}): not supported by this model (arborlm serves text-only models)")


def video(path, num_frames=None):
    """SGLang's video input: refused, as image() is."""
    raise NotImplementedError(f"video({path!r}): not supported by this model (arborlm serves text-only models)")


def _schema(json_schema) -> tuple[str | None, type | None]:
    """A dict, a JSON string or a pydantic model class -> (JSON string, model class or None)."""
    if json_schema is None or isinstance(json_schema, str):
        return json_schema, None
    if isinstance(json_schema, dict):
        return json.dumps(json_schema), None
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        return json.dumps(json_schema.model_json_schema()), json_schema
    raise TypeError(f"json_schema: a dict, a JSON string or a pydantic model class, got {json_schema!r}")


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None, n: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None, temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype: type | str | None = None,
        choices: list[str] | None = None, choices_method=None, regex: str | None = None, json_schema=None,
        tools: list[dict] | None = None, tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None, tool_format: str = "hermes"):
    """Generate into variable `name` (SGLang's signature). `choices` makes it select(name, choices);
    `dtype` (int, float, bool, str or their names) constrains it with SGLang's REGEX_* (and wins over
    `regex`, with a warning, as in SGLang); `n` > 1 makes the variable a list of n samples (the text
    continues with the first).

    `tools` (OpenAI function tools, with `tool_choice` and `parallel_tool_calls` as in the OpenAI
    API; an arborlm extension) constrains the reply to `tool_format`'s calls the way the server's
    /v1/chat/completions does; the variable holds the text as written, and its meta info holds
    "tool_calls" (OpenAI's shape) and "content". Show the model its tools with tools_prompt()."""
    if choices:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or _choices.token_length_normalized)
    if dtype is not None:
        if dtype not in ir.DTYPE_REGEX:
            raise TypeError(f"gen {name!r}: dtype must be int, float, bool or str, got {dtype!r}")
        if regex is not None:
            warnings.warn(f"gen {name!r}: both dtype and regex are set; dtype is used (as SGLang does)", stacklevel=2)
        regex = ir.DTYPE_REGEX[dtype]
    if regex is not None:
        re.compile(regex)  # a bad pattern fails here, where it is written
    schema, model = _schema(json_schema)
    if regex is not None and schema is not None:
        raise ValueError(f"gen {name!r}: pass regex or json_schema, not both")
    tool_ctx = _tools(name, tools, tool_choice, parallel_tool_calls, tool_format)
    if tool_ctx is not None and (regex is not None or schema is not None):
        raise ValueError(f"gen {name!r}: tools cannot be combined with regex, json_schema or dtype")
    params = ir.SglSamplingParams(max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=stop,
                                  stop_token_ids=stop_token_ids, stop_regex=stop_regex, n=n, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
                                  presence_penalty=presence_penalty, ignore_eos=ignore_eos, regex=regex,
                                  json_schema=schema, return_logprob=return_logprob,
                                  logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                                  return_text_in_logprobs=return_text_in_logprobs,
                                  structural_tag=json.dumps(tool_ctx.structural_tag()) if tool_ctx else None,
                                  json_schema_strict=tool_ctx.strict if tool_ctx else None)
    return ir.Gen(name, params, dtype, model, tool_ctx)


def _tools(name, tools, tool_choice, parallel_tool_calls, tool_format):
    if tools is None and tool_choice is None:
        return None
    from arborlm.runtime.errors import BadRequestError
    from arborlm.runtime.tool_calls import FORMATS, ToolContext

    if tool_format not in FORMATS:
        raise ValueError(f"gen {name!r}: tool_format must be one of {sorted(FORMATS)}, got {tool_format!r}")
    try:
        return ToolContext.from_request(tools, tool_choice, parallel_tool_calls, FORMATS[tool_format])
    except BadRequestError as e:
        raise ValueError(f"gen {name!r}: {e}") from None


def tools_prompt(tools: list[dict], tool_format: str = "hermes") -> str:
    """The block that shows a model its tools and how to call them (what the server puts in the
    system message for a chat template without tool support): put it in your system() turn."""
    ctx = _tools(None, tools, "auto", None, tool_format)
    if ctx is None:
        raise ValueError("tools_prompt: needs at least one tool")
    return ctx.system_block()


def gen_int(name: str | None = None, max_tokens: int | None = None, n: int | None = None, **kwargs):
    return gen(name, max_tokens=max_tokens, n=n, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, n: int | None = None, **kwargs):
    return gen(name, max_tokens=max_tokens, n=n, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: _choices.ChoicesSamplingMethod = _choices.token_length_normalized):
    """Pick one of `choices` by its logprob given the text so far, scored in one batched request."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"select {name!r}: choices must be a non-empty list of strings, got {choices!r}")
    if not isinstance(choices_method, _choices.ChoicesSamplingMethod):
        raise TypeError(f"select {name!r}: choices_method must be a ChoicesSamplingMethod, got {choices_method!r}")
    return ir.Select(name, list(choices), temperature, choices_method)


def _role(role: str, expr=None):
    items = [ir.RoleBegin(role)] + ([] if expr is None else [expr]) + [ir.RoleEnd(role)]
    return ir.ExprList(items)


def separate_reasoning(expr=None, model_type: str | None = None):
    """SGLang's reasoning split needs a reasoning parser for the model's think tags; none is built in."""
    raise NotImplementedError("separate_reasoning(): not supported (arborlm has no reasoning parser)")


def system(expr=None):
    return _role("system", expr)


def user(expr=None):
    return _role("user", expr)


def assistant(expr=None):
    return _role("assistant", expr)


def system_begin():
    return ir.RoleBegin("system")


def system_end():
    return ir.RoleEnd("system")


def user_begin():
    return ir.RoleBegin("user")


def user_end():
    return ir.RoleEnd("user")


def assistant_begin():
    return ir.RoleBegin("assistant")


def assistant_end():
    return ir.RoleEnd("assistant")
