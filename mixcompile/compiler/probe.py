"""Inputs built from a model that came without any, so ``convert`` can run it once (to verify the rewrite
and see each FFN's token layout) and the CLI can time it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixcompile.errors import ConfigError
from mixcompile.models.tiny_gpt import TinyGPT


def example_inputs(
    model: nn.Module, *, batch: int = 2, seq: int = 16, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)``: token ids for language models, pixels for vision ones."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyGPT):
        return {"tokens": torch.randint(0, model.wte.num_embeddings, (batch, seq), generator=g).to(device)}
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"cannot make an example input for {type(model).__name__}: the CLI knows Hugging Face models and "
            "mixcompile's demo model. In Python, pass your own inputs."
        )
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        pixels = torch.randn(batch, config.num_channels, size, size, generator=g)
        return {"pixel_values": pixels.to(device)}
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ConfigError(
            f"cannot make an example input for {type(model).__name__}: its config has no vocab_size."
        )
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    inputs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    return inputs
