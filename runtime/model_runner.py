"""The one place that touches the model and the KV tensors: loads weights, sizes the pools, and
turns a ScheduleBatch into a ForwardBatch, logits and sampled tokens."""

from __future__ import annotations

import logging
import time

import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.config import EngineArgs
from arborlm.runtime.model import loader
from arborlm.runtime.model.attention import TorchAttentionBackend
from arborlm.runtime.model.forward_batch import ForwardBatch
from arborlm.runtime.model.llama import LlamaModel
from arborlm.runtime.sampling.sampler import SampleOutput, Sampler, SampleRow
from arborlm.runtime.scheduler.scheduler import ScheduleBatch

logger = logging.getLogger(__name__)

# Cascade decode attention pays once a batch shares a long prefix; below these it is not worth it.
CASCADE_MIN_BATCH = 2
CASCADE_MIN_PREFIX = 64


class ModelRunner:
    def __init__(self, args: EngineArgs):
        t0 = time.perf_counter()
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.args = args
        self.files = loader.resolve_model(args.model_path, args.tokenizer_path)
        self.config = loader.load_config(self.files.model_dir)
        self.context_length = args.context_length or self.config.max_position_embeddings
        self.model = LlamaModel(self.config, loader.load_weights(self.files.model_dir), args.torch_dtype,
                                self.context_length)
        m = self.model
        per_token = TokenToKVPool.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, m.dtype)
        size = args.max_total_tokens or int(args.kv_cache_gb * (1 << 30)) // per_token
        self.kv_pool = TokenToKVPool(size, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype)
        self.req_pool = ReqToTokenPool(args.max_running_requests, self.context_length)
        self.attn = TorchAttentionBackend(self.kv_pool, m.num_heads, m.num_kv_heads, m.head_dim)
        self.vocab_size = self.config.vocab_size
        logger.info("model loaded in %.1fs; KV pool %d tokens", time.perf_counter() - t0, size)

    def make_sampler(self, eos_ids: set[int]) -> Sampler:
        return Sampler(self.vocab_size, eos_ids, seed=self.args.random_seed)

    def forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        ids, pos, starts, slots_ext, logit_idx = [], [], [], [], []
        table = self.req_pool.table
        t = 0
        n_ext = len(batch.reqs) - batch.num_decode
        for req, p, n, samples in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, batch.samples):
            ids.extend(req.all_ids[p : p + n])
            pos.extend(range(p, p + n))
            starts.append(t)
            t += n
            if samples:
                logit_idx.append(t - 1)
        rows = [r.row for r in batch.reqs]
        ends = [p + n for p, n in zip(batch.prefix_lens, batch.extend_lens)]
        out_slots = torch.cat([table[r, p:e] for r, p, e in zip(rows, batch.prefix_lens, ends)])
        for i in range(n_ext):
            slots_ext.append(table[rows[i], : ends[i]] if batch.prefix_lens[i] else None)
        decode_slots = decode_mask = prefix_slots = None
        if batch.num_decode:
            d_rows, d_lens = torch.tensor(rows[n_ext:]), torch.tensor(ends[n_ext:])
            p = self._shared_prefix_len(d_rows, int(d_lens.min()))
            if p:
                prefix_slots = table[d_rows[0], :p]
            lens = d_lens - p
            L = int(lens.max())
            decode_slots = table[d_rows, p : p + L]
            if int(lens.min()) != L:
                valid = torch.arange(L).unsqueeze(0) < lens.unsqueeze(1)
                decode_slots = decode_slots.masked_fill(~valid, 0)
                decode_mask = valid[:, None, None, :]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            out_slots=out_slots,
            extend_starts=starts[:n_ext],
            extend_lens=batch.extend_lens[:n_ext],
            extend_prefix_lens=batch.prefix_lens[:n_ext],
            extend_slots=slots_ext,
            num_decode=batch.num_decode,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            logit_idx=torch.tensor(logit_idx, dtype=torch.int64),
            decode_prefix_slots=prefix_slots,
        )

    def _shared_prefix_len(self, rows: torch.Tensor, min_len: int) -> int:
        """Slots shared by every decoding request (a common cached prefix), when worth a cascade."""
        if rows.numel() < CASCADE_MIN_BATCH or min_len < CASCADE_MIN_PREFIX:
            return 0
        t = self.req_pool.table[rows, :min_len]
        differs = (t != t[:1]).any(dim=0)
        p = int(differs.int().argmax()) if bool(differs.any()) else min_len
        return p if p >= CASCADE_MIN_PREFIX else 0

    def run(self, batch: ScheduleBatch, sampler: Sampler) -> tuple[list[int | None], SampleOutput | None]:
        """Forward one step; return the sampled token per request (None where it only prefilled)."""
        fb = self.forward_batch(batch)
        logits = self.model.forward(fb, self.attn)
        sampling = [i for i, s in enumerate(batch.samples) if s and batch.reqs[i].params.max_new_tokens > 0]
        next_ids: list[int | None] = [None] * len(batch.reqs)
        if not sampling:
            return next_ids, None
        # logits rows follow the requests that reached their last pending token
        row_of = {i: j for j, i in enumerate(i for i, s in enumerate(batch.samples) if s)}
        logits = logits[[row_of[i] for i in sampling]]
        reqs = [batch.reqs[i] for i in sampling]
        out = sampler(logits, [
            SampleRow(r.params, r.generator, r.prompt_ids, r.output_ids, r.return_logprob, r.top_logprobs_num,
                      r.grammar)
            for r in reqs
        ])
        full_lp, full_top = [None] * len(batch.reqs), [None] * len(batch.reqs)
        for j, i in enumerate(sampling):
            next_ids[i] = out.next_ids[j]
            full_lp[i], full_top[i] = out.logprobs[j], out.top_logprobs[j]
        return next_ids, SampleOutput(next_ids, full_lp, full_top)
