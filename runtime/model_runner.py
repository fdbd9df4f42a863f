"""The one place that touches the model and the KV tensors: loads weights, sizes the pools, and
turns a ScheduleBatch into a ForwardBatch, logits and sampled tokens."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from arborlm.runtime.cache.memory_pool import ReqToTokenPool, TokenToKVPool
from arborlm.runtime.config import EngineArgs
from arborlm.runtime.model import loader
from arborlm.runtime.model import registry
from arborlm.runtime.model.attention import make_attention_backend
from arborlm.runtime.model.execution import plan_execution
from arborlm.runtime.model.forward_batch import ForwardBatch
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
        limit = registry.context_limit(self.config)
        self.context_length = min(args.context_length or limit, limit)
        self.plan = plan_execution(args.torch_dtype, args.quantization, args.device, args.compile_decode)
        self.model = registry.model_class(self.config)(self.config, loader.load_weights(self.files.model_dir),
                                                       self.plan, self.context_length)
        m = self.model
        per_token = TokenToKVPool.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, m.dtype)
        size = args.max_total_tokens or int(args.kv_cache_gb * (1 << 30)) // per_token
        self.kv_pool = TokenToKVPool(size, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype)
        self.req_pool = ReqToTokenPool(args.max_running_requests, self.context_length)
        self.attn = make_attention_backend(args.attention_backend, self.kv_pool, m.num_heads, m.num_kv_heads, m.head_dim)
        m.cpu_fused = getattr(self.attn, "cpu_kernels", False) and m.dtype != torch.float32
        self.vocab_size = self.config.vocab_size
        self.decode_graphs = None
        if self.plan.compile_decode:
            from arborlm.runtime.model.decode_graph import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self.model, self.kv_pool, self.req_pool.table,
                                              background=args.compile_in_background,
                                              worker_args=args if args.compile_worker else None)
            # before serving: graphs an earlier process compiled (seconds), so the first request is fast
            self.decode_graphs.load_saved(args.max_running_requests)
            self.decode_graphs.warm_up(min(args.warmup_decode_bs, args.max_running_requests))
        elif args.warmup_decode_bs:
            logger.warning("warmup_decode_bs=%d has nothing to warm: decode is not compiled (%s)",
                           args.warmup_decode_bs, self.plan.describe())
        logger.info("model loaded in %.1fs; KV pool %d tokens; %s", time.perf_counter() - t0, size, self.plan.describe())

    def make_sampler(self, eos_ids: set[int]) -> Sampler:
        return Sampler(self.vocab_size, eos_ids, seed=self.args.random_seed)

    def prepare_inputs(self, batch: ScheduleBatch) -> tuple[ForwardBatch, list[PromptLogprobRows]]:
        """Lay the scheduler's batch out as the model's inputs, and the extra rows prompt logprobs need."""
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
        prompt_rows = self._prompt_logprob_rows(batch, starts, len(logit_idx))
        for pr in prompt_rows:
            logit_idx.extend(pr.token_idx)
        rows = [r.row for r in batch.reqs]
        ends = [p + n for p, n in zip(batch.prefix_lens, batch.extend_lens)]
        out_slots = torch.cat([table[r, p:e] for r, p, e in zip(rows, batch.prefix_lens, ends)])
        gathers = getattr(self.attn, "gathers_slots", False)
        for i in range(n_ext):
            slots_ext.append(table[rows[i], : ends[i]] if gathers and batch.prefix_lens[i] else None)
        decode_slots = decode_mask = prefix_slots = None
        if batch.num_decode:
            d_rows, d_lens = torch.tensor(rows[n_ext:]), torch.tensor(ends[n_ext:])
            p = self._shared_prefix_len(d_rows, int(d_lens.min()))
            if p:
                prefix_slots = table[d_rows[0], :p]
        if batch.num_decode and gathers:
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
            req_to_token=table,
            req_rows=torch.tensor(rows, dtype=torch.int64),
            seq_lens=torch.tensor(ends, dtype=torch.int64),
        ), prompt_rows

    @staticmethod
    def _prompt_logprob_rows(batch: ScheduleBatch, starts: list[int], first_row: int) -> list["PromptLogprobRows"]:
        """Which extra logits rows this step must return for prompt logprobs: the logits at
        position q score prompt token q + 1."""
        out, row = [], first_row
        for i in range(len(batch.reqs) - batch.num_decode):
            req, p, n = batch.reqs[i], batch.prefix_lens[i], batch.extend_lens[i]
            owed = req.input_logprob_start
            if owed is None:
                continue
            lo, hi = max(owed - 1, p), min(p + n, len(req.prompt_ids) - 1)
            if hi <= lo and owed != 0:
                continue
            pr = PromptLogprobRows(i, first_none=owed == 0, targets=req.prompt_ids[lo + 1 : hi + 1],
                                   token_idx=[starts[i] + q - p for q in range(lo, hi)], rows=(row, row + max(hi - lo, 0)))
            row += max(hi - lo, 0)
            out.append(pr)
        return out

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
        fb, prompt_rows = self.prepare_inputs(batch)
        logits = self._forward(batch, fb, prompt_rows)
        if prompt_rows:
            self._record_prompt_logprobs(batch, logits, prompt_rows)
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

    def _forward(self, batch: ScheduleBatch, fb: ForwardBatch, prompt_rows) -> torch.Tensor:
        """A pure decode step runs as a compiled graph when one is ready for its batch size."""
        graphs = self.decode_graphs
        if graphs is not None and fb.num_decode == len(batch.reqs) and not prompt_rows and graphs.available(fb.num_decode):
            prefix = 0 if fb.decode_prefix_slots is None else int(fb.decode_prefix_slots.numel())
            return graphs(fb.input_ids, fb.positions, fb.out_slots, fb.req_rows, fb.seq_lens, prefix)
        return self.model.forward(fb, self.attn)

    @staticmethod
    def _record_prompt_logprobs(batch: ScheduleBatch, logits: torch.Tensor, prompt_rows) -> None:
        for pr in prompt_rows:
            req = batch.reqs[pr.batch_index]
            if pr.first_none:
                req.input_logprobs.append((None, req.prompt_ids[0]))
                req.input_top_logprobs.append([])
            if not pr.targets:
                continue
            logp = torch.log_softmax(logits[pr.rows[0] : pr.rows[1]], dim=-1)
            chosen = logp.gather(1, torch.tensor(pr.targets).unsqueeze(1)).squeeze(1).tolist()
            req.input_logprobs.extend(zip(chosen, pr.targets))
            k = req.top_logprobs_num
            if k > 0:
                tv, ti = logp.topk(k, dim=-1)
                req.input_top_logprobs.extend([list(zip(v, t)) for v, t in zip(tv.tolist(), ti.tolist())])
            else:
                req.input_top_logprobs.extend([] for _ in chosen)


@dataclass
class PromptLogprobRows:
    """The logits rows of one request's prompt logprobs in this step."""

    batch_index: int
    first_none: bool  # the prompt's first token has no logprob: record it as None
    targets: list[int]  # the prompt tokens these rows score
    token_idx: list[int]  # their positions among the step's tokens
    rows: tuple[int, int]  # their rows in the returned logits
