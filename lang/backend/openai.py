"""A backend for any OpenAI-compatible endpoint, through the legacy /v1/completions route: the
DSL renders its own text (roles with `chat_template` from `tokenizer_path`, else plain `role:`
lines), so plain completions are all it needs.

`select` needs prompt logprobs: a completions request with `echo`, `logprobs` and `max_tokens: 0`
(the legacy OpenAI API, vLLM and arborlm's server answer it), plus a local tokenizer to find where
each choice starts (`tokenizer_path=`). Where either is missing, select raises a BackendError
saying so. Prefill-only warm-ups are skipped: an OpenAI endpoint has no prefix cache to warm.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref

import httpx

from arborlm.lang.backend.base import Backend, BackendError, GenerateCall, ModelInfo, sse_events

# native sampling parameter -> completions field (the last group are extensions SGLang and vLLM take)
_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop": "stop",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
           "n": "n", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
           "min_new_tokens": "min_tokens", "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
           "regex": "regex", "json_schema": "json_schema", "ebnf": "ebnf"}


class OpenAI(Backend):
    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key: str | None = None,
                 tokenizer_path: str | None = None, timeout: float = 600.0):
        self.model = model
        self.base_url = base_url.rstrip("/")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        return self._clients[loop]

    def _body(self, call: GenerateCall, prompt) -> dict:
        body = {"model": self.model, "prompt": prompt}
        for k, v in call.sampling_params.items():
            if k not in _FIELDS:
                raise BackendError(f"sampling parameter {k!r} has no OpenAI completions equivalent")
            if v is not None:
                body[_FIELDS[k]] = v
        if call.return_logprob:
            body["logprobs"] = max(call.top_logprobs_num, 0)
        return body

    async def _post(self, body: dict) -> dict:
        r = await self._client().post("/completions", json=body)
        if r.status_code >= 400:
            raise BackendError(_message(r.text), r.status_code)
        return r.json()

    async def generate(self, call: GenerateCall):
        single = call.text is not None and isinstance(call.text, str) or call.input_ids is not None and (
            not call.input_ids or isinstance(call.input_ids[0], int))
        prompts = call.text if call.text is not None else call.input_ids
        prompts = [prompts] if single else list(prompts)
        scoring = call.sampling_params.get("max_new_tokens") == 0
        if scoring and not call.return_logprob:  # a cache warm-up: nothing to do here
            out = [{"text": "", "output_ids": [], "meta_info": {}} for _ in prompts]
        else:
            body = self._body(call, prompts if len(prompts) > 1 else prompts[0])
            if scoring:
                body.update(echo=True, max_tokens=0, logprobs=max(call.top_logprobs_num, 0))
            data = await self._post(body)
            out = [self._result(c, call, scoring) for c in sorted(data["choices"], key=lambda c: c["index"])]
        return out[0] if single and len(out) == 1 else out

    def _result(self, choice: dict, call: GenerateCall, scoring: bool) -> dict:
        meta = {"finish_reason": {"type": choice.get("finish_reason")}}
        lp = choice.get("logprobs")
        if call.return_logprob:
            if not lp or not lp.get("token_logprobs"):
                raise BackendError("this endpoint returned no logprobs (select needs prompt logprobs via echo)")
            entries = [[v, None, t] for v, t in zip(lp["token_logprobs"], lp["tokens"])]
            if scoring:
                start = max(call.logprob_start_len, 0)
                meta["input_token_logprobs"] = entries[start:]
            else:
                meta["output_token_logprobs"] = entries
        return {"text": "" if scoring else choice["text"], "meta_info": meta}

    async def generate_stream(self, call: GenerateCall):
        body = {**self._body(call, call.text if call.text is not None else call.input_ids), "stream": True}
        async with self._client().stream("POST", "/completions", json=body) as r:
            if r.status_code >= 400:
                raise BackendError(_message((await r.aread()).decode(errors="replace")), r.status_code)
            async for chunk in sse_events(r):
                for c in chunk.get("choices", []):
                    meta = {"finish_reason": {"type": c["finish_reason"]}} if c.get("finish_reason") else {}
                    yield {"text": c.get("text", ""), "meta_info": meta}

    def _tok(self):
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise BackendError("select and chat templates through the OpenAI backend need tokenizer_path= "
                                   "(an OpenAI endpoint exposes no tokenizer)")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._tok().encode(t) for t in texts]

    async def model_info(self) -> ModelInfo:
        if self.tokenizer_path is None:
            return ModelInfo()
        tok = self._tok()
        return ModelInfo(tok.chat_template, tok.bos_token, tok.eos_token)


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text
