"""A small byte-level GPT (nanoGPT-style), the model the demo and examples build themselves.

Plain PyTorch, nothing mixcompile-specific: it stands in for "your model".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcompile.errors import ConfigError, check_positive_int


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.c_proj(self.gelu(self.c_fc(x)))
        return y


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        y: torch.Tensor = x + self.mlp(self.ln_2(x))
        return y


class TinyGPT(nn.Module):
    """Byte-level causal LM: ``tokens [B, T] -> logits [B, T, vocab]``."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        d_ff: int = 256,
        max_seq: int = 128,
    ) -> None:
        super().__init__()
        self.max_seq = max_seq
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding (every sequence of the batch at once, so MoT groups stay full)."""
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.max_seq :])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens


TINY_GPT_LIMITS = {
    "vocab_size": 1 << 20,
    "d_model": 1 << 14,
    "n_layer": 256,
    "n_head": 256,
    "d_ff": 1 << 16,
    "max_seq": 1 << 16,
}
MAX_TINY_GPT_PARAMS = 1 << 31


def build_tiny_gpt(
    vocab_size: int = 256,
    d_model: int = 64,
    n_layer: int = 4,
    n_head: int = 4,
    d_ff: int = 256,
    max_seq: int = 128,
) -> TinyGPT:
    """A TinyGPT that remembers how it was built, so ``mixcompile.save`` names this builder (registered as
    ``tiny_gpt``) in the manifest and ``mixcompile.load`` rebuilds the base without being handed code.

    Its arguments may come from an untrusted manifest, so they are checked before anything is allocated."""
    kwargs = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "n_layer": n_layer,
        "n_head": n_head,
        "d_ff": d_ff,
        "max_seq": max_seq,
    }
    for name, value in kwargs.items():
        check_positive_int(name, value)
        if value > TINY_GPT_LIMITS[name]:
            raise ConfigError(f"{name}={value} is larger than a TinyGPT allows ({TINY_GPT_LIMITS[name]}).")
    if d_model % n_head:
        raise ConfigError(f"d_model={d_model} must be divisible by n_head={n_head}.")
    params = (vocab_size + max_seq) * d_model * 2 + n_layer * (4 * d_model * d_model + 2 * d_model * d_ff)
    if params > MAX_TINY_GPT_PARAMS:
        raise ConfigError(
            f"these sizes make a TinyGPT of about {params:,} parameters; the limit is "
            f"{MAX_TINY_GPT_PARAMS:,}."
        )
    model = TinyGPT(**kwargs)
    model.mixcompile_base = {"kind": "builder", "name": "tiny_gpt", "kwargs": kwargs}  # type: ignore[assignment]
    return model
