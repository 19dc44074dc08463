"""What MoT blocks know of the batch around them: which tokens are padding, and how many sequences there are.

A MoT block mixes tokens *across* sequences, so it must know which positions are padding (they take no
part in their group) and, when its FFN sees flattened ``[B*T, d]`` tokens, how many sequences ``B`` there
are. Neither is an argument of the FFN. ``convert`` therefore hooks the modules of a converted model that
take the model's own inputs (``input_ids`` / ``inputs_embeds`` with an ``attention_mask``: a Hugging Face
model, its encoder and decoder stacks; ``nn.TransformerEncoder`` / ``Decoder`` with their key padding
masks): for the duration of their forward, every MoT block below them sees the mask and the batch size.
The innermost hooked module wins, so a decoder's own mask overrides the encoder's. Hand-written models
use :func:`token_mask` around their forward instead.

Activation checkpointing runs a layer's forward a second time, during backward, when the hooked forward
has long returned: the blocks then take the context of the forward whose outputs backward has reached
(:func:`_restore_in_backward`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd import Variable

if TYPE_CHECKING:
    from mixcompile.runtime.blocks.mot import MoTBlock

# A block's context stack holds (mask [B, T] bool or None, batch size) entries; the last one applies.
TokenContext = tuple[torch.Tensor | None, int]


@dataclass(frozen=True)
class _Spec:
    """Where a module's forward takes the mask and the tensors that give the batch size."""

    mask: str
    inverted: bool  # True where the mask marks padding (PyTorch's key_padding_mask), not tokens
    batch_args: tuple[tuple[str, int], ...]  # (argument, its batch axis); the first one given is used


def _spec(module: nn.Module) -> _Spec | None:
    if isinstance(module, nn.TransformerEncoder | nn.TransformerDecoder):
        layer = module.layers[0] if len(module.layers) else None
        batch_axis = 0 if layer is None or layer.self_attn.batch_first else 1
        name, source = (
            ("src_key_padding_mask", "src")
            if isinstance(module, nn.TransformerEncoder)
            else ("tgt_key_padding_mask", "tgt")
        )
        return _Spec(name, True, ((name, 0), (source, batch_axis)))
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return None
    tokens = [name for name in ("input_ids", "inputs_embeds") if name in params]
    if "attention_mask" not in params or not tokens:
        return None
    return _Spec("attention_mask", False, (("attention_mask", 0), *((name, 0) for name in tokens)))


class TokenContextHook:
    """A forward pre-hook (and its matching post-hook) that gives ``blocks`` the module's mask and batch
    size for the duration of its forward. A class, not a closure, so a converted model deep-copies and
    pickles; the argument positions are read from the signature once, so the hook traces under
    ``torch.compile``."""

    def __init__(self, module: nn.Module, spec: _Spec, blocks: Sequence[MoTBlock]) -> None:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        self.spec = spec
        self.positions = {name: names.index(name) for name, _ in spec.batch_args if name in names}
        self.blocks = list(blocks)

    def _argument(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = self._argument(self.spec.mask, args, kwargs)
        batch = None
        for name, axis in self.spec.batch_args:
            value = self._argument(name, args, kwargs)
            if isinstance(value, torch.Tensor) and value.dim() > axis:
                batch = value.shape[axis]
                break
        if batch is None:  # nothing says how many sequences: the blocks keep what an outer module said
            for block in self.blocks:
                block.token_context.append(block.token_context[-1] if block.token_context else (None, 0))
            return
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = ~mask.bool() if self.spec.inverted else mask.bool()
        else:  # no mask, or a prepared (e.g. 4-D) one: no padding to exclude here
            mask = None
        for block in self.blocks:
            block.token_context.append((mask, batch))

    def done(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        contexts = [(block, block.token_context.pop()) for block in self.blocks]
        _restore_in_backward(contexts, output)


def _restore_in_backward(contexts: list[tuple[MoTBlock, TokenContext]], output: Any) -> None:
    """When backward reaches this forward's outputs, give each block its context again until the backward
    ends, for the layers activation checkpointing recomputes there (without it, padding would join the
    groups and flattened tokens would have no batch size). Backward runs a later forward's part of the graph
    before an earlier one's, so with several forwards in one backward each recomputation sees its own.
    Compiled, a recomputation is part of the compiled graph, which holds the context as an input."""
    if torch.compiler.is_compiling():
        return
    tensors = [t for t in _tensors(output) if t.requires_grad]
    if not tensors:
        return

    def restore(grad: torch.Tensor) -> None:
        for block, context in contexts:
            block.recompute_context = context
        Variable._execution_engine.queue_callback(forget)

    def forget() -> None:
        for block, _ in contexts:
            block.recompute_context = None

    for tensor in tensors:
        tensor.register_hook(restore)


def _tensors(output: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """The tensors of a forward's output, through dicts (a ``ModelOutput``), tuples and lists: a loss may be
    computed from any of them (the hidden states of every layer, for one)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif depth and isinstance(output, dict | tuple | list):
        for value in output.values() if isinstance(output, dict) else output:
            yield from _tensors(value, depth - 1)


def install_token_hooks(model: nn.Module) -> None:
    """Hook every module of ``model`` that takes the model's inputs and holds MoT blocks, replacing the
    token hooks it had (a previous conversion's, which knew fewer blocks)."""
    from mixcompile.runtime.blocks.mot import MoTBlock

    for module in model.modules():
        _remove_token_hooks(module)
        spec = _spec(module)
        blocks = [m for m in module.modules() if isinstance(m, MoTBlock)]
        if spec is not None and blocks:
            hook = TokenContextHook(module, spec, blocks)
            module.register_forward_pre_hook(hook, with_kwargs=True)
            module.register_forward_hook(hook.done, with_kwargs=True, always_call=True)


def _remove_token_hooks(module: nn.Module) -> None:
    """Drop this module's token hooks and their flags (by key: handles would not survive a deep copy)."""
    for key in [k for k, hook in module._forward_pre_hooks.items() if _is_token_hook(hook)]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in [k for k, hook in module._forward_hooks.items() if _is_token_hook(hook)]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)


def covered_by_token_hooks(model: nn.Module, path: str) -> bool:
    """Whether a module on the way from ``model`` to ``path`` (both included) would get a token hook."""
    parts = path.split(".") if path else []
    return any(_spec(model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts) + 1))


def _is_token_hook(hook: object) -> bool:
    return isinstance(hook, TokenContextHook) or isinstance(getattr(hook, "__self__", None), TokenContextHook)


@contextlib.contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor | None, *, batch: int | None = None) -> Iterator[None]:
    """For hand-written models: every MoT block of ``model`` treats the positions where ``mask [B, T]`` is
    False (0) as padding for the duration of the ``with`` body. ``mask=None`` with ``batch=B`` only says how
    many sequences there are (what a block on flattened ``[B*T, d]`` tokens needs)."""
    from mixcompile.runtime.blocks.mot import MoTBlock

    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise TypeError(f"mask must be a [batch, seq] tensor, got {getattr(mask, 'shape', type(mask))}.")
    size = mask.shape[0] if mask is not None else batch
    if size is None:
        raise TypeError("token_mask needs a mask or a batch size.")
    context: TokenContext = (mask.bool() if mask is not None else None, int(size))
    blocks = [m for m in model.modules() if isinstance(m, MoTBlock)]
    for block in blocks:
        block.token_context.append(context)
    # backward comes after the body: each forward's outputs bring the context back for recomputations
    handle = model.register_forward_hook(
        lambda m, a, out: _restore_in_backward([(b, context) for b in blocks], out)
    )
    try:
        yield
    finally:
        handle.remove()
        for block in blocks:
            block.token_context.pop()
