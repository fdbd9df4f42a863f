"""Llama causal LM over the paged KV pool; Mistral and Qwen2 reuse it (their files say how they
differ).

q/k/v and gate/up are fused into one matmul each, to keep the op count of a decode step low.
`forward` runs any batch eagerly through an attention backend; `decode` is the same stack over
fixed-shape tensors only (attention and the KV write are opaque custom ops), so a decode step can
be captured once per batch size by torch.compile and never recompile as contexts grow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arborlm.runtime.errors import ModelLoadError
from arborlm.runtime.model.execution import ExecutionPlan
from arborlm.runtime.model.forward_batch import ForwardBatch
from arborlm.runtime.model.layers.activation import silu_and_mul
from arborlm.runtime.model.layers.linear import Linear
from arborlm.runtime.model.layers.norm import RMSNorm
from arborlm.runtime.model.layers.rotary import Rotary


class Weights:
    """Named checkpoint tensors, with errors that name what is missing."""

    def __init__(self, tensors, plan: ExecutionPlan):
        self.tensors, self.plan = tensors, plan

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
        return self.tensors[name]

    def linear(self, *names: str, bias: bool = False, form: str | None = None) -> Linear:
        """`form` overrides the plan's weight-only form for this layer (layers/linear.py)."""
        weight = torch.cat([self.get(n + ".weight") for n in names])
        b = torch.cat([self.get(n + ".bias") for n in names]) if bias else None
        return Linear(weight, b, self.plan, form)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, w: Weights, prefix: str):
        super().__init__()
        act, eps = w.plan.act_dtype, config.rms_norm_eps
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.in_norm = RMSNorm(w.get(prefix + "input_layernorm.weight"), eps, act)
        attn = prefix + "self_attn."
        self.qkv = w.linear(*(attn + f"{x}_proj" for x in "qkv"), bias=w.has(attn + "q_proj.bias"))
        self.o = w.linear(attn + "o_proj")
        self.post_norm = RMSNorm(w.get(prefix + "post_attention_layernorm.weight"), eps, act)
        self.gate_up = w.linear(prefix + "mlp.gate_proj", prefix + "mlp.up_proj")
        self.down = w.linear(prefix + "mlp.down_proj")

    def forward(self, x, cos, sin, attend) -> torch.Tensor:
        """`attend(q [T,H,D], k [T,Hkv,D], v) -> [T, H*D]` writes k/v to the pool and attends."""
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(self.in_norm(x))
        qk = Rotary.rotate(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
        o = attend(qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * D :].view(T, Hkv, D))
        x = x + self.o(o)
        return x + self.down(silu_and_mul(self.gate_up(self.post_norm(x))))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, weights, plan: ExecutionPlan, max_positions: int):
        super().__init__()
        self.config, self.plan = config, plan
        self.dtype = plan.act_dtype  # activations and KV
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        w = Weights(weights, plan)
        tied = getattr(config, "tie_word_embeddings", False) or not w.has("lm_head.weight")
        # The head (often tied to the embedding, 8-bit in GGUF checkpoints) is not int4: group-32 int4
        # costs it half a quantisation step of the embedding's Q8_0 values. Where the layers are
        # quantised, its few-row matmuls (decode) use group-32 int8 instead, which holds Q8_0 values
        # exactly and reads half of bf16's bytes; batches and the embedding use its dense weight.
        # Unquantised plans (float32 by default) keep the dense weight alone.
        head_form = "int8_group" if plan.quantization != "none" else "none"
        self.lm_head = w.linear("model.embed_tokens" if tied else "lm_head", form=head_form)
        embed = self.lm_head.weight if tied else w.get("model.embed_tokens.weight").to(self.dtype)
        self.register_buffer("embed", embed, persistent=False)
        self.final_norm = RMSNorm(w.get("model.norm.weight"), self.eps, self.dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, w, f"model.layers.{i}.") for i in range(self.num_layers))
        self.rotary = Rotary(config, max_positions, self.dtype)
        # The fused Triton layers of arborlm.kernels: None uses them on CUDA tensors only; True forces
        # them (tests, under Triton's CPU interpreter); False keeps the torch ops.
        self.fused_kernels: bool | None = None
        # The fused C++ CPU layers (layers/fused_cpu.py) for eager forwards; the model runner turns
        # them on where their extension is built and activations are bf16/fp16 (float32 keeps
        # torch's op sequence, the reference the token-identity tests check).
        self.cpu_fused = False

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn) -> torch.Tensor:
        """Any batch, eagerly; float32 logits [len(batch.logit_idx), vocab]."""
        x = F.embedding(batch.input_ids, self.embed)
        if (x.is_cuda if self.fused_kernels is None else self.fused_kernels):
            from arborlm import kernels

            return self._forward_fused(batch, attn, x, kernels)
        if self.cpu_fused:
            from arborlm.runtime.model.layers import fused_cpu

            return self._forward_fused(batch, attn, x, fused_cpu)
        cos, sin = self.rotary.tables(batch.positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, lambda q, k, v: attn.forward(q, k, v, i, batch))
        return self.lm_head(self.final_norm(x[batch.logit_idx])).float()

    def decode(self, input_ids, positions, out_slots, k_buffer, v_buffer, req_to_token, req_rows, seq_lens,
               prefix_len) -> torch.Tensor:
        """One decode token per row, over tensors whose shapes depend on the batch size only:
        float32 logits [B, vocab]. Run under inference mode by the caller (compiled or not)."""
        from arborlm.runtime.model.layers import paged_attention  # noqa: F401  registers the ops

        ops = torch.ops.arborlm
        scale = self.head_dim**-0.5
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary.tables(positions)
        for i, layer in enumerate(self.layers):
            def attend(q, k, v, i=i):
                ops.kv_write(k_buffer, v_buffer, i, out_slots, k, v)
                o = ops.decode_attention(q.contiguous(), k_buffer, v_buffer, i, req_to_token, req_rows, seq_lens,
                                         prefix_len, scale)
                return o.view(q.shape[0], -1)

            x = layer(x, cos, sin, attend)
        return self.lm_head(self.final_norm(x)).float()

    def _forward_fused(self, batch: ForwardBatch, attn, x: torch.Tensor, ops) -> torch.Tensor:
        """`forward` with fused layers (`ops`: arborlm.kernels' Triton ones or layers.fused_cpu's
        C++ ones, same signatures): each residual add rides in the next norm, RoPE rotates q and k
        where they lie in the qkv output, and the MLP's activation is one pass."""
        rmsnorm, rope, fused_silu_and_mul = ops.rmsnorm, ops.rope, ops.silu_and_mul
        T = batch.num_tokens
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        layers = self.layers
        h, residual = rmsnorm(x, layers[0].in_norm.weight, self.eps), x
        for i, L in enumerate(layers):
            if i:
                h, residual = rmsnorm(x, L.in_norm.weight, self.eps, residual=residual)
            qkv = L.qkv(h)
            q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
            rope(q, k, self.rotary.cos, self.rotary.sin, batch.positions)
            o = attn.forward(q, k, qkv[:, (H + Hkv) * D :].view(T, Hkv, D), i, batch)
            h, residual = rmsnorm(L.o(o), L.post_norm.weight, self.eps, residual=residual)
            x = L.down(fused_silu_and_mul(L.gate_up(h)))
        idx = batch.logit_idx
        h, _ = rmsnorm(x[idx], self.final_norm.weight, self.eps, residual=residual[idx])
        return self.lm_head(h).float()
