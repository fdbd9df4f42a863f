"""SGLang's native API: POST /generate (single or batched, streaming or not, prompt logprobs)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict

from arborlm.runtime.constrained.validate import document_check
from arborlm.runtime.errors import BadRequestError
from arborlm.runtime.request_check import check_logprob_options, sample_params
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.server.tokenizer_manager import ReqState, TokenizerManager


class GenerateRequest(BaseModel):
    """SGLang's GenerateReqInput. Fields SGLang clients send that ask for nothing we lack are
    accepted; those that ask for what we lack (images, LoRA, ...) are refused by name when set
    (NULL_ONLY); a field no SGLang version knows is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = -1
    top_logprobs_num: int | list[int] | None = 0
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    # accepted: bookkeeping that does not change the result
    log_metrics: bool = True
    no_logs: bool = False
    custom_labels: dict[str, Any] | None = None
    modalities: list[str] | None = None  # per-image modality tags: meaningless without images
    priority: int | None = None
    conversation_id: str | None = None
    extra_key: str | list[str] | None = None
    data_parallel_rank: int | None = None
    routed_dp_rank: int | None = None
    # refused unless null / false / empty
    token_ids_logprob: Any = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    session_params: Any = None
    return_hidden_states: Any = False
    return_entropy: Any = False
    return_bytes: Any = False
    background: Any = False
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None


# field -> why it is refused when set (to anything but null / false / an empty list)
NULL_ONLY = {
    "token_ids_logprob": "logprobs of chosen token ids are not supported; use top_logprobs_num",
    "input_embeds": "input embeddings are not supported; pass text or input_ids",
    "image_data": "this model takes text only",
    "video_data": "this model takes text only",
    "audio_data": "this model takes text only",
    "lora_path": "LoRA adapters are not supported",
    "lora_id": "LoRA adapters are not supported",
    "custom_logit_processor": "custom logit processors are not supported (they run pickled code)",
    "session_params": "sessions are not supported",
    "return_hidden_states": "hidden states are not returned",
    "return_entropy": "entropies are not returned",
    "return_bytes": "token bytes are not returned",
    "background": "background requests are not supported",
    "bootstrap_host": "prefill/decode disaggregation is not supported",
    "bootstrap_port": "prefill/decode disaggregation is not supported",
    "bootstrap_room": "prefill/decode disaggregation is not supported",
    "bootstrap_pair_key": "prefill/decode disaggregation is not supported",
}


def _refuse_unsupported(req: GenerateRequest) -> None:
    for name, why in NULL_ONLY.items():
        v = getattr(req, name)
        if v is None or v is False or (isinstance(v, list) and not any(x is not None for x in v)):
            continue
        raise BadRequestError(f"{name}: not supported: {why}")
    if req.modalities and any(m not in (None, "text") for m in req.modalities):
        raise BadRequestError("modalities: not supported: this model takes text only")
    if req.data_parallel_rank not in (None, 0) or req.routed_dp_rank not in (None, 0):
        raise BadRequestError("data_parallel_rank: this server has one data-parallel rank (0)")


class TokenizeRequest(BaseModel):
    """POST /tokenize: the ids /generate would use for `text` (a select needs its token boundaries)."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str]


class SubRequest:
    """One prompt x one of its n samples, ready for the tokenizer manager."""

    def __init__(self, index, ids, params, return_logprob, logprob_start_len, top_logprobs_num, rid):
        self.index, self.ids, self.params, self.rid = index, ids, params, rid
        self.return_logprob, self.logprob_start_len, self.top_logprobs_num = return_logprob, logprob_start_len, top_logprobs_num
        self.priority: int | None = None
        self.admission = None  # the HTTP request's Admission (the route sets both)

    def run(self, tm: TokenizerManager, stream: bool = True):
        return tm.generate(self.ids, self.params, self.return_logprob, self.logprob_start_len, self.top_logprobs_num,
                           rid=self.rid, stream=stream, priority=self.priority, admission=self.admission)

    async def final(self, tm: TokenizerManager) -> ReqState:
        state = None
        async for state in self.run(tm, stream=False):
            pass
        return state


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequestError(f"{name}: a list must have one entry per prompt ({n}), got {len(value)}")
        return value
    return [value] * n


def expand(req: GenerateRequest, tm: TokenizerManager) -> tuple[list[SubRequest], bool]:
    """Split a /generate body into sub-requests; returns them and whether the answer is a single dict."""
    _refuse_unsupported(req)
    if (req.text is None) == (req.input_ids is None):
        raise BadRequestError("text / input_ids: pass exactly one of them")
    if req.text is not None:
        single = isinstance(req.text, str)
        texts = [req.text] if single else req.text
        if not texts:
            raise BadRequestError("text: the list is empty")
        ids_list = [tm.encode(t) for t in texts]
    else:
        single = not req.input_ids or isinstance(req.input_ids[0], int)
        ids_list = [req.input_ids] if single else req.input_ids
    n = len(ids_list)
    sps = _per_prompt(req.sampling_params, n, "sampling_params")
    lps = [bool(x) for x in _per_prompt(req.return_logprob, n, "return_logprob")]  # null: the default
    starts = [-1 if x is None else x for x in _per_prompt(req.logprob_start_len, n, "logprob_start_len")]
    tops = [x or 0 for x in _per_prompt(req.top_logprobs_num, n, "top_logprobs_num")]
    rids = _per_prompt(req.rid, n, "rid") if isinstance(req.rid, list) else [req.rid] * n if single else [None] * n
    subs = []
    for i, ids in enumerate(ids_list):
        params = SamplingParams.from_dict(sps[i])
        tm.check_ids(ids, params, "text" if req.text is not None else "input_ids")
        check_logprob_options(starts[i], tops[i], tm.limits.vocab_size)
        for j in range(params.n):
            p = params if params.n == 1 else sample_params(params, j)
            rid = rids[i] if params.n == 1 or rids[i] is None else f"{rids[i]}-{j}"
            subs.append(SubRequest(len(subs), ids, p, lps[i], starts[i], tops[i], rid))
    return subs, single and len(subs) == 1


def logprob_entries(tm: TokenizerManager, pairs, with_text: bool) -> list:
    texts = tm.token_texts([t for _, t in pairs]) if with_text else [None] * len(pairs)
    return [[lp, t, s] for (lp, t), s in zip(pairs, texts)]


def meta_info(tm: TokenizerManager, st: ReqState, sub: SubRequest, with_text: bool) -> dict:
    meta = {
        "id": st.rid,
        "finish_reason": st.finish_reason,
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": len(st.output_ids),
        "cached_tokens": st.cached_tokens,
        "e2e_latency": st.e2e_latency,
    }
    meta.update(document_check(sub.params, st.text, st.finished))
    if sub.return_logprob:
        meta["input_token_logprobs"] = logprob_entries(tm, st.input_logprobs, with_text)
        meta["output_token_logprobs"] = logprob_entries(tm, st.output_logprobs, with_text)
        meta["input_top_logprobs"] = [logprob_entries(tm, top, with_text) for top in st.input_top_logprobs]
        meta["output_top_logprobs"] = [logprob_entries(tm, top, with_text) for top in st.output_top_logprobs]
    return meta


def result(tm: TokenizerManager, st: ReqState, sub: SubRequest, with_text: bool) -> dict:
    return {"text": st.text, "output_ids": list(st.output_ids), "meta_info": meta_info(tm, st, sub, with_text)}


def stream_chunk(tm: TokenizerManager, st: ReqState, sub: SubRequest, with_text: bool, sent: dict) -> dict:
    """A native stream event as SGLang's client reads it: the text so far (cumulative), and the
    output logprobs new since the previous event with their running count in
    `output_token_logprobs_length` (SGLang's frontend checks both). `sent` counts per sub-request."""
    out = result(tm, st, sub, with_text)
    meta = out["meta_info"]
    if sub.return_logprob:
        k = sent.get(sub.index, 0)
        n = len(meta["output_token_logprobs"])
        meta["output_token_logprobs"] = meta["output_token_logprobs"][k:]
        meta["output_top_logprobs"] = meta["output_top_logprobs"][k:]
        meta["output_token_logprobs_length"] = n
        sent[sub.index] = n
    return out


async def run_all(tm: TokenizerManager, subs: list[SubRequest], with_text: bool) -> list[dict]:
    async def one(sub):
        return result(tm, await sub.final(tm), sub, with_text)

    return list(await asyncio.gather(*(one(s) for s in subs)))


async def stream_all(subs: list[SubRequest], tm: TokenizerManager):
    """Yield (sub, state) from all sub-requests as updates arrive; cancels the rest on exit."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(sub):
        try:
            async for st in sub.run(tm):
                await queue.put((sub, st))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((sub, e))
        finally:
            await queue.put((sub, done))

    tasks = [asyncio.ensure_future(pump(s)) for s in subs]
    try:
        left = len(tasks)
        while left:
            sub, item = await queue.get()
            if item is done:
                left -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield sub, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
