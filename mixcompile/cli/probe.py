"""Example inputs for a model, so the CLI can verify and time models it did not build."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixcompile.cli.tiny_gpt import TinyGPT
from mixcompile.errors import ConfigError


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


POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "max_sequence_length")


def max_sequence_length(model: nn.Module) -> int | None:
    """The longest input ``model`` takes (``None`` when it does not say, e.g. relative positions)."""
    if isinstance(model, TinyGPT):
        return model.max_seq
    config = getattr(model, "config", None)
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output (logits, last hidden state, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot find the output tensor in a {type(output).__name__}.")
