"""A backend speaking an arborlm (or SGLang) server's native HTTP API, with one pooled async
httpx client per event loop (a client's connections belong to the loop that opened them)."""

from __future__ import annotations

import asyncio
import json
import weakref

import httpx

from arborlm.lang.backend.base import Backend, BackendError, GenerateCall, ModelInfo, sse_events


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._info: ModelInfo | None = None

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            client = self._clients[loop] = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                                             timeout=self.timeout, limits=limits)
        return client

    @staticmethod
    async def _check(r: httpx.Response) -> None:
        if r.status_code >= 400:
            body = (await r.aread()).decode(errors="replace")
            try:
                body = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise BackendError(body, r.status_code)

    async def _post(self, path: str, body: dict):
        r = await self._client().post(path, json=body)
        await self._check(r)
        return r.json()

    async def generate(self, call: GenerateCall):
        return await self._post("/generate", call.body())

    async def generate_stream(self, call: GenerateCall):
        """The native stream repeats the whole text so far in each event (yield the new part) and
        sends each output logprob once (gathered here, so the last chunk's meta_info has them all)."""
        sent = 0
        logprobs: dict[str, list] = {"output_token_logprobs": [], "output_top_logprobs": []}
        async with self._client().stream("POST", "/generate", json={**call.body(), "stream": True}) as r:
            await self._check(r)
            async for chunk in sse_events(r):
                text = chunk["text"]
                meta = chunk.get("meta_info", {})
                for key, acc in logprobs.items():
                    if key in meta:
                        acc.extend(meta[key])
                        meta[key] = list(acc)
                yield {**chunk, "text": text[sent:]}
                sent = len(text)

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        return (await self._post("/tokenize", {"text": texts}))["input_ids"]

    async def flush_cache(self) -> bool:
        r = await self._client().post("/flush_cache")
        return r.status_code == 200

    async def server_info(self) -> dict:
        r = await self._client().get("/get_server_info")
        await self._check(r)
        return r.json()

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            r = await self._client().get("/get_model_info")
            await self._check(r)
            d = r.json()
            self._info = ModelInfo(d.get("chat_template"), d.get("bos_token"), d.get("eos_token"))
        return self._info
