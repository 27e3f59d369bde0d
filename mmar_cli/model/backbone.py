"""The decoder-only transformer: Qwen2/Llama style (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Module names follow Hugging Face's Qwen2 (`layers.0.self_attn.q_proj`, ...) so that importing a
Qwen2 checkpoint is a rename (see qwen2_adapter.py). Attention always takes an explicit boolean mask
(True = may attend) because MMAR's mask is not causal inside an image; see attention_mask.py.

The KV cache is deliberately plain: one growing (k, v) pair per layer. A forward pass over new
positions attends to the cached keys plus its own, and appends its keys only when asked, which is what
image generation needs (the prompt is cached once, the image span is re-run every iteration).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (as Qwen2 does): bf16 sums of squares lose the small components
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] at positions idx [B, m] -> [B, m, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin of RoPE for arbitrary integer positions (the frame's indices, not 0..T-1)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class KVCache:
    """Per-layer keys/values of the positions already run, [B, kv_heads, T, head_dim] each."""

    def __init__(self, n_layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * n_layers
        self.v: List[Optional[torch.Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer: int = 0,
                update_cache: bool = True, keep: Optional[torch.Tensor] = None):
        """keep [B, m]: only these positions ask (queries, output [B, m, width]); all of x still answer."""
        B, T, _ = x.shape
        xq = x if keep is None else take(x, keep)
        q = self.q_proj(xq).view(B, xq.shape[1], self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype).expand(B, -1, -1), sin.to(q.dtype).expand(B, -1, -1)
        cos_q, sin_q = (cos, sin) if keep is None else (take(cos, keep), take(sin, keep))
        if keep is not None:
            mask = mask.expand(B, -1, -1, -1).gather(2, keep[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
        q = q * cos_q.unsqueeze(1) + rotate_half(q) * sin_q.unsqueeze(1)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        if cache is not None:
            if cache.k[layer] is not None:
                k = torch.cat((cache.k[layer].to(k.dtype), k), dim=2)
                v = torch.cat((cache.v[layer].to(v.dtype), v), dim=2)
            if update_cache:
                cache.k[layer], cache.v[layer] = k, v
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if q.device.type == "cpu":
            # CPU's fused kernel with an explicit mask made a whole training step ~1.5x slower than the
            # math path at our short sequence lengths (benchmarks/run.py); elsewhere torch picks.
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, xq.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, mlp_hidden: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(width, eps)
        self.self_attn = Attention(width, heads, kv_heads, qkv_bias)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = MLP(width, mlp_hidden)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, update_cache=True, keep=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, update_cache, keep)
        x = (x if keep is None else take(x, keep)) + attn
        return x + self.mlp(self.post_attention_layernorm(x))


def block_from_cfg(cfg) -> Block:
    return Block(cfg.width, cfg.heads, cfg.kv_heads, cfg.mlp_hidden, cfg.qkv_bias, cfg.norm_eps)


class Backbone(nn.Module):
    """Text embedding, decoder blocks, final norm and LM head. `cfg` is a resolved ModelConfig."""

    def __init__(self, cfg):
        super().__init__()
        self.grad_checkpointing = bool(cfg.grad_checkpointing)
        self.compiled: Optional[list] = None  # compiled twins of the layers, for training (MMAR.compile_training)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(block_from_cfg(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.width // cfg.heads, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: Optional[KVCache] = None, update_cache: bool = True,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, width] input embeddings at `positions` ([T] or [B, T]); mask [B, 1, T, T_cache + T]
        bool. Returns the final-normed hidden states [B, T, width], or with `keep` [B, m] (indices into
        T) those of the kept positions only, [B, m, width]: the last block then runs its queries, MLP and
        norm on them alone (image generation reads the positions it draws next, not the whole image)."""
        cos, sin = self.rotary(positions)
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        train = self.training and cache is None
        for i, block in enumerate(self.layers):
            block_keep = keep if i == len(self.layers) - 1 else None
            if train and self.compiled and torch.is_grad_enabled():
                block = self.compiled[i]
            if self.grad_checkpointing and train:
                x = checkpoint(block, x, cos, sin, mask, None, i, True, block_keep, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, update_cache, block_keep)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
