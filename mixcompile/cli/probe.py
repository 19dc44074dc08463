"""What the CLI reads off a model it did not build: the longest input it takes, and its output tensor (its
inputs are :func:`mixcompile.compiler.probe.example_inputs`, which ``convert`` builds too)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixcompile.errors import ConfigError
from mixcompile.models.tiny_gpt import TinyGPT

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
