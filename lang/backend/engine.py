"""The in-process backend: an arborlm Engine, called through its awaitable API so that waiting
for the model never blocks the program's event loop (the Engine computes on its own thread)."""

from __future__ import annotations

from arborlm.lang.backend.base import Backend, GenerateCall, ModelInfo


class EngineBackend(Backend):
    def __init__(self, engine):
        self.engine = engine

    def _kwargs(self, call: GenerateCall) -> dict:
        return dict(prompt=call.text, input_ids=call.input_ids, sampling_params=call.sampling_params,
                    return_logprob=call.return_logprob, top_logprobs_num=call.top_logprobs_num,
                    logprob_start_len=call.logprob_start_len)

    async def generate(self, call: GenerateCall):
        return await self.engine.async_generate(**self._kwargs(call))

    async def generate_stream(self, call: GenerateCall):
        async for chunk in await self.engine.async_generate(**self._kwargs(call), stream=True):
            yield chunk

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.engine.tokenizer.encode(t) for t in texts]

    async def model_info(self) -> ModelInfo:
        tok = self.engine.tokenizer
        return ModelInfo(tok.chat_template, tok.bos_token, tok.eos_token)

    async def flush_cache(self) -> bool:
        import asyncio

        return await asyncio.to_thread(self.engine.flush_cache)

    async def server_info(self) -> dict:
        import dataclasses

        return {**dataclasses.asdict(self.engine.args), "scheduler": self.engine.get_stats()}
