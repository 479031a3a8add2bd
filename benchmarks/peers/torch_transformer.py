"""A PyTorch port of ``quartic.models.Transformer`` (LM head), loaded with the same weights.

Op for op the same network as the flax module: token + learned position embedding, pre-LayerNorm
blocks (eps 1e-5) with multi-head causal attention (masked scores set to the dtype's finite minimum,
PAD keys masked), a tanh-approximated GELU MLP, a final LayerNorm and a linear head. Used only by the
benchmarks, so that PyTorch tools (PyHessian) see exactly the function quartic differentiates;
:func:`max_logit_difference` checks that before any timing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.scale + self.bias


class Dense(nn.Module):
    """``x W + b`` with ``W [d_in, d_out]`` stored as in flax (no transpose)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.kernel + self.bias


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, causal: bool):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.q_proj, self.k_proj = Dense(d, d), Dense(d, d)
        self.v_proj, self.o_proj = Dense(d, d), Dense(d, d)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        h = self.n_heads
        q = self.q_proj(x).reshape(b, t, h, d // h)
        k = self.k_proj(x).reshape(b, t, h, d // h)
        v = self.v_proj(x).reshape(b, t, h, d // h)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // h)
        allowed = key_mask.reshape(b, 1, 1, t)
        if self.causal:
            tril = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
            allowed = allowed & tril.reshape(1, 1, t, t)
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        w = torch.softmax(scores, dim=-1)
        y = torch.einsum("bhqk,bkhe->bqhe", w, v).reshape(b, t, d)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int, causal: bool):
        super().__init__()
        self.ln_attn = LayerNorm(d)
        self.attn = Attention(d, n_heads, causal)
        self.ln_mlp = LayerNorm(d)
        self.fc_in, self.fc_out = Dense(d, d_ff), Dense(d_ff, d)

    def forward(self, x, key_mask):
        x = x + self.attn(self.ln_attn(x), key_mask)
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_mlp(x)), approximate="tanh"))


class TorchTransformer(nn.Module):
    """The LM-head transformer of a ``TransformerConfig`` (no LoRA, no classifier head)."""

    def __init__(self, config):
        super().__init__()
        if config.n_classes is not None or config.lora_rank:
            raise ValueError("the port covers the LM head without LoRA")
        d = config.d_model
        self.pad_id = config.pad_id
        self.token_embed = nn.Parameter(torch.zeros(config.vocab_size, d))
        self.pos_embed = nn.Parameter(torch.zeros(config.seq_len, d))
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.d_ff, config.causal) for _ in range(config.n_layers)
        )
        self.ln_final = LayerNorm(d)
        self.head = Dense(d, config.vocab_size)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.token_embed[tokens] + self.pos_embed[:t].unsqueeze(0)
        mask = tokens != self.pad_id
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_final(x))


def _flax_to_torch_names(params: dict) -> dict[str, np.ndarray]:
    """Flatten the flax param dict to torch state-dict names (``blocks.0.attn.q_proj.kernel``)."""
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, name + ".")
            else:
                out[name] = np.array(v)  # a writable copy for torch

    walk(params, "")
    renamed = {}
    for name, value in out.items():
        name = name.replace(".mlp.fc_in", ".fc_in").replace(".mlp.fc_out", ".fc_out")
        renamed[name] = value
    return renamed


def from_flax(config, params: dict, dtype=torch.float64) -> TorchTransformer:
    """A :class:`TorchTransformer` holding exactly the weights of the flax ``params`` dict."""
    model = TorchTransformer(config).to(dtype)
    state = _flax_to_torch_names(params)
    expected = dict(model.named_parameters())
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    if missing or extra:
        raise ValueError(f"weight names do not match: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(torch.as_tensor(state[name], dtype=dtype))
    return model


def max_logit_difference(model: TorchTransformer, apply_fn, params, tokens) -> float:
    """``max |logits_torch − logits_jax|`` on ``tokens`` (the port check)."""
    with torch.no_grad():
        ours = model(torch.as_tensor(np.array(tokens), dtype=torch.long)).numpy()
    ref = np.asarray(apply_fn(params, tokens))
    return float(np.max(np.abs(ours - ref)))
