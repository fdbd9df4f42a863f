"""Llama-family causal LM forward (Llama, Mistral, Qwen2) over the paged KV pool.

Plain tensors and functional ops instead of nn.Modules: q/k/v and gate/up projections are fused
into one matmul each, and q and k get RoPE in one call, to keep the op count of a decode step low
(on a CPU, batch-1 decode of a 135M model is bound by per-op overhead as much as by FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arborlm.runtime.errors import ModelLoadError
from arborlm.runtime.model.forward_batch import ForwardBatch
from arborlm.runtime.model.linear import Linear, compute_dtype


def rope_cos_sin(config, max_positions: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] honouring config.rope_parameters (via transformers)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    else:
        raise ModelLoadError(f"unsupported rope_type {rope_type!r} in the model config")
    t = torch.arange(max_positions, dtype=torch.float)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class LlamaModel:
    def __init__(self, config, weights: dict[str, torch.Tensor], dtype, max_positions: int):
        self.config = config
        self.dtype = compute_dtype(dtype)  # activations and KV; weights also keep `dtype` copies
        self.weight_dtype = dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        self.inter = config.intermediate_size
        self._load(weights)
        self.cos, self.sin = rope_cos_sin(config, max_positions, self.dtype)
        # The fused Triton layers of arborlm.kernels: None uses them on CUDA tensors only; True forces
        # them (tests, under Triton's CPU interpreter); False keeps the torch ops.
        self.fused_kernels: bool | None = None

    def _load(self, w: dict[str, torch.Tensor]) -> None:
        def take(name, cast=True):
            if name not in w:
                raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
            return w[name].to(self.dtype).contiguous() if cast else w[name]

        def linear(*names, bias=False):
            weight = torch.cat([take(n + ".weight", cast=False) for n in names])
            b = torch.cat([take(n + ".bias", cast=False) for n in names]) if bias else None
            return Linear(weight, b, self.weight_dtype, self.dtype)

        tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in w
        self.lm_head = linear("model.embed_tokens" if tied else "lm_head")
        self.embed = self.lm_head.weight if tied else take("model.embed_tokens.weight")
        self.final_norm = take("model.norm.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                dict(
                    in_norm=take(p + "input_layernorm.weight"),
                    qkv=linear(*(p + f"self_attn.{x}_proj" for x in "qkv"), bias=p + "self_attn.q_proj.bias" in w),
                    o=linear(p + "self_attn.o_proj"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=linear(p + "mlp.gate_proj", p + "mlp.up_proj"),
                    down=linear(p + "mlp.down_proj"),
                )
            )

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # As transformers computes it, in float32: a bf16 norm loses this model's large activation
        # outliers. Plain ops beat F.rms_norm here, which on CPU decomposes into more of them.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn) -> torch.Tensor:
        """Return float32 logits [len(batch.logit_idx), vocab]."""
        x = F.embedding(batch.input_ids, self.embed)
        fused = x.is_cuda if self.fused_kernels is None else self.fused_kernels
        if fused:
            return self._forward_fused(batch, attn, x)
        T = batch.num_tokens
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin[batch.positions].unsqueeze(1)
        for i, L in enumerate(self.layers):
            h = self._norm(x, L["in_norm"])
            qkv = L["qkv"](h)
            qk = self._rope(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
            o = attn.forward(q, k, v, i, batch)
            x = x + L["o"](o)
            h = self._norm(x, L["post_norm"])
            gu = L["gate_up"](h)
            x = x + L["down"](F.silu(gu[:, : self.inter]) * gu[:, self.inter :])
        x = x[batch.logit_idx]
        x = self._norm(x, self.final_norm)
        return self.lm_head(x).float()

    def _forward_fused(self, batch: ForwardBatch, attn, x: torch.Tensor) -> torch.Tensor:
        """`forward` with the Triton kernels: each residual add rides in the next norm, RoPE rotates
        q and k where they lie in the qkv output, and the MLP's activation is one pass."""
        from arborlm.kernels import rmsnorm, rope, silu_and_mul

        T = batch.num_tokens
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        h, residual = rmsnorm(x, self.layers[0]["in_norm"], self.eps), x
        for i, L in enumerate(self.layers):
            if i:
                h, residual = rmsnorm(x, L["in_norm"], self.eps, residual=residual)
            qkv = L["qkv"](h)
            q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
            rope(q, k, self.cos, self.sin, batch.positions)
            o = attn.forward(q, k, qkv[:, (H + Hkv) * D :].view(T, Hkv, D), i, batch)
            h, residual = rmsnorm(L["o"](o), L["post_norm"], self.eps, residual=residual)
            x = L["down"](silu_and_mul(L["gate_up"](h)))
        idx = batch.logit_idx
        h, _ = rmsnorm(x[idx], self.final_norm, self.eps, residual=residual[idx])
        return self.lm_head(h).float()
