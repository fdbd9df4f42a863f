"""What the interpreter needs from a backend: native /generate calls (optionally streamed),
tokenisation (to find where a select choice starts) and the model's chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator


class BackendError(Exception):
    """A backend refused or failed a request (an HTTP status, when it came from one)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.status = status


@dataclass
class GenerateCall:
    """One native /generate request: the body SGLang's server takes, and what Engine.generate takes."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    # The program's chat so far, for backends that speak chat completions (not part of the body):
    # the finished turns, and the text of the open assistant turn (None when none is open).
    messages: list[dict] | None = None
    assistant_prefix: str | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body, leaving out fields at their defaults (so recorded calls read short)."""
        out: dict[str, Any] = {"text": self.text} if self.text is not None else {"input_ids": self.input_ids}
        out["sampling_params"] = self.sampling_params
        for k, default in (("return_logprob", False), ("logprob_start_len", -1), ("top_logprobs_num", 0),
                           ("return_text_in_logprobs", False), ("stream", False)):
            if getattr(self, k) != default:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def prefill(cls, text: str | None = None, input_ids: list[int] | None = None) -> "GenerateCall":
        """A prefill-only request: puts a prefix into the radix cache and generates nothing."""
        return cls(text=text, input_ids=input_ids, sampling_params={"max_new_tokens": 0})


@dataclass
class ModelInfo:
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


async def sse_events(response):
    """The JSON events of a server-sent-event stream up to `data: [DONE]`; an error event raises."""
    import json

    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            code = err.get("code")
            raise BackendError(err.get("message", str(event)), code if isinstance(code, int) else None)
        yield event


class Backend:
    """Base class; `select` scoring and chat rendering are built on these four calls."""

    supports_prompt_logprobs = True

    async def generate(self, call: GenerateCall) -> dict | list[dict]:
        raise NotImplementedError

    def generate_stream(self, call: GenerateCall) -> AsyncIterator[dict]:
        """Chunks whose `text` is the new text since the previous chunk; the last has the final meta_info."""
        raise NotImplementedError

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    async def model_info(self) -> ModelInfo:
        raise NotImplementedError

    async def flush_cache(self) -> bool:
        """Empty the server's prefix cache (SGLang's `flush_cache`)."""
        raise BackendError(f"{type(self).__name__} has no prefix cache to flush")

    async def server_info(self) -> dict:
        """The server's settings and counters (SGLang's `get_server_info`)."""
        raise BackendError(f"{type(self).__name__} reports no server info")
