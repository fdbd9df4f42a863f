"""A backend for any OpenAI-compatible endpoint, in two modes, as SGLang's OpenAI backend has:

- **completions** (/v1/completions): the DSL renders its own text (roles with `chat_template` from
  `tokenizer_path`, else plain `role:` lines). `select` needs prompt logprobs: a completions request
  with `echo`, `logprobs` and `max_tokens: 0` (the legacy OpenAI API, vLLM and arborlm's server
  answer it), plus a local tokenizer to find where each choice starts (`tokenizer_path=`).
- **chat** (/v1/chat/completions), for chat-only endpoints: a `gen` right after `sgl.assistant(`
  sends the finished turns as `messages` and becomes the assistant's reply. `select` asks for each
  choice as the reply, constrained by a `regex` extension field with `logprobs`, and scores the
  choice's tokens; an endpoint that refuses or ignores the constraint gets a clear error.

`is_chat_model`: True always uses chat (a gen outside an assistant turn is an error, as in SGLang),
False always completions, None (default) chat inside assistant turns and completions elsewhere.
Prefill-only warm-ups are skipped: an OpenAI endpoint has no prefix cache to warm.
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
           "regex": "regex", "json_schema": "json_schema", "ebnf": "ebnf", "stop_regex": "stop_regex"}


class OpenAI(Backend):
    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key: str | None = None,
                 tokenizer_path: str | None = None, timeout: float = 600.0, is_chat_model: bool | None = None):
        self.model = model
        self.is_chat_model = is_chat_model
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

    @staticmethod
    def _sampling(call: GenerateCall, body: dict, api: str) -> dict:
        """The call's sampling parameters under their OpenAI names, added to `body`."""
        for k, v in call.sampling_params.items():
            if k not in _FIELDS:
                raise BackendError(f"sampling parameter {k!r} has no OpenAI {api} equivalent")
            if v is not None:
                body[_FIELDS[k]] = v
        return body

    def _body(self, call: GenerateCall, prompt) -> dict:
        body = self._sampling(call, {"model": self.model, "prompt": prompt}, "completions")
        if call.return_logprob:
            body["logprobs"] = max(call.top_logprobs_num, 0)
        return body

    async def _post(self, body: dict, path: str = "/completions") -> dict:
        r = await self._client().post(path, json=body)
        if r.status_code == 404 and path == "/completions":
            raise BackendError("this endpoint has no /v1/completions: with a chat-only server, put each gen right "
                               "after sgl.assistant( (chat completions) or pass is_chat_model=True", 404)
        if r.status_code >= 400:
            raise BackendError(_message(r.text), r.status_code)
        return r.json()

    # ---- chat mode ------------------------------------------------------------------------------------
    def chat_mode(self, assistant_prefix: str | None) -> bool:
        """Whether a call made with this open assistant turn (None: none open) goes to chat completions."""
        if self.is_chat_model is False:
            return False
        if assistant_prefix is None:
            if self.is_chat_model:
                raise BackendError("with a chat model, gen and select must be inside sgl.assistant(...) "
                                   "(chat completions only write the assistant's reply)")
            return False
        return True

    def _chat_body(self, call: GenerateCall) -> dict:
        if call.assistant_prefix:
            raise BackendError("chat completions cannot continue a partly written assistant turn: put the gen "
                               f"right after sgl.assistant( (the turn already holds {call.assistant_prefix[:40]!r})")
        body = self._sampling(call, {"model": self.model, "messages": call.messages or []}, "chat completions")
        if call.return_logprob:
            body["logprobs"] = True
            if call.top_logprobs_num:
                body["top_logprobs"] = call.top_logprobs_num
        return body

    @staticmethod
    def _chat_result(choice: dict, usage: dict | None) -> dict:
        meta = {"finish_reason": {"type": choice.get("finish_reason")}}
        if usage:
            meta["prompt_tokens"], meta["completion_tokens"] = usage.get("prompt_tokens"), usage.get("completion_tokens")
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None:
            meta["output_token_logprobs"] = [[e["logprob"], None, e["token"]] for e in content]
        return {"text": choice["message"].get("content") or "", "meta_info": meta}

    async def _chat_generate(self, call: GenerateCall):
        data = await self._post(self._chat_body(call), "/chat/completions")
        out = [self._chat_result(c, data.get("usage")) for c in sorted(data["choices"], key=lambda c: c["index"])]
        return out[0] if len(out) == 1 else out

    async def score_chat_choices(self, messages: list[dict], prefix: str, choices: list[str]) -> list[list[float]]:
        """Each choice's token logprobs as the assistant's reply after `prefix`: the reply is forced to
        prefix + choice by a regex and its logprobs (the model's, before the constraint) are read back."""
        import re

        async def one(choice: str) -> list[float]:
            target = prefix + choice
            body = {"model": self.model, "messages": messages, "max_tokens": len(target.encode()) + 8,
                    "temperature": 0, "logprobs": True, "regex": re.escape(target)}
            try:
                data = await self._post(body, "/chat/completions")
            except BackendError as e:
                raise BackendError(f"select through chat completions needs an endpoint that takes a `regex` "
                                   f"constraint and returns logprobs (arborlm and SGLang do): {e}", e.status) from None
            c = data["choices"][0]
            content = (c.get("logprobs") or {}).get("content")
            if c["message"].get("content") != target or not content:
                raise BackendError("select through chat completions: the endpoint ignored the `regex` constraint or "
                                   "returned no logprobs, so the choices cannot be scored")
            skip, pos, lps = len(prefix.encode()), 0, []
            for e in content:  # a token counts for the choice when it ends past the prefix
                pos += len(bytes(e["bytes"])) if e.get("bytes") is not None else len(e["token"].encode())
                if pos > skip:
                    lps.append(e["logprob"])
            return lps

        return list(await asyncio.gather(*(one(c) for c in choices)))

    # ---- both modes ----------------------------------------------------------------------------------
    async def generate(self, call: GenerateCall):
        if self.chat_mode(call.assistant_prefix) and call.sampling_params.get("max_new_tokens") != 0:
            return await self._chat_generate(call)
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
        chat = self.chat_mode(call.assistant_prefix)
        if chat:
            body, path = {**self._chat_body(call), "stream": True}, "/chat/completions"
        else:
            body, path = {**self._body(call, call.text if call.text is not None else call.input_ids), "stream": True}, "/completions"
        async with self._client().stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                raise BackendError(_message((await r.aread()).decode(errors="replace")), r.status_code)
            async for chunk in sse_events(r):
                for c in chunk.get("choices", []):
                    meta = {"finish_reason": {"type": c["finish_reason"]}} if c.get("finish_reason") else {}
                    text = (c.get("delta") or {}).get("content") or "" if chat else c.get("text", "")
                    yield {"text": text, "meta_info": meta}

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
