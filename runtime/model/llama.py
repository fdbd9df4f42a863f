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
        self.dtype = dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        self.inter = config.intermediate_size
        self._load(weights)
        self.cos, self.sin = rope_cos_sin(config, max_positions, dtype)

    def _load(self, w: dict[str, torch.Tensor]) -> None:
        def take(name):
            if name not in w:
                raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
            return w[name].to(self.dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in w
        self.lm_head = self.embed if tied else take("lm_head.weight")
        self.final_norm = take("model.norm.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            qkv = [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
            bias = None
            if p + "self_attn.q_proj.bias" in w:  # Qwen2
                bias = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            self.layers.append(
                dict(
                    in_norm=take(p + "input_layernorm.weight"),
                    qkv=torch.cat(qkv, 0).contiguous(),
                    qkv_bias=bias,
                    o=take(p + "self_attn.o_proj.weight"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0).contiguous(),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as transformers does: bf16 F.rms_norm loses the model's large
        # activation outliers and derails generation.
        return F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn) -> torch.Tensor:
        """Return float32 logits [len(batch.logit_idx), vocab]."""
        T = batch.num_tokens
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin[batch.positions].unsqueeze(1)
        x = F.embedding(batch.input_ids, self.embed)
        for i, L in enumerate(self.layers):
            h = self._norm(x, L["in_norm"])
            qkv = F.linear(h, L["qkv"], L["qkv_bias"])
            qk = self._rope(qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
            o = attn.forward(q, k, v, i, batch)
            x = x + F.linear(o, L["o"])
            h = self._norm(x, L["post_norm"])
            gu = F.linear(h, L["gate_up"])
            x = x + F.linear(F.silu(gu[:, : self.inter]) * gu[:, self.inter :], L["down"])
        x = x[batch.logit_idx]
        x = self._norm(x, self.final_norm)
        return F.linear(x, self.lm_head).float()
