"""What MoT blocks know of the batch around them: which tokens are padding, and how many sequences there are.

A MoT block mixes tokens *across* sequences, so it must know which positions are padding (they take no
part in their group) and, when its FFN sees flattened ``[B*T, d]`` tokens, how many sequences ``B`` there
are. Neither is an argument of the FFN. ``convert`` therefore hooks the modules of a converted model that
take the model's own inputs (``input_ids`` / ``inputs_embeds`` with an ``attention_mask``: a Hugging Face
model, its encoder and decoder stacks; ``nn.TransformerEncoder`` / ``Decoder`` with their key padding
masks): for the duration of their forward, every MoT block below them sees the mask and the batch size,
and whether the forward was given a key/value cache (then the mask also covers the cached positions, and
a block takes its last columns). A Hugging Face encoder-decoder model (a forward with
``decoder_input_ids``, and ``get_encoder()``) gives its encoder's blocks ``attention_mask`` and the other
(the decoder's) blocks ``decoder_attention_mask`` (no mask if it gives none). The innermost hooked module
wins, so a decoder's own mask overrides the encoder's. Hand-written models use :func:`token_mask` around
their forward instead.

A hook of the compiled module itself (``torch.compile(model)``) runs outside the compiled frame, in a
frame of its own; a hook below it runs inside. So a hook only records what its forward was given
(:class:`TokenContext`), and the blocks compute from it: an operation in the hook would compile a graph of
its own, and a batch size recorded as a number would be a constant the compiled forward guards on (a
recompilation for every new batch size), where a tensor's size is symbolic.

Activation checkpointing runs a layer's forward a second time, during backward, when the hooked forward
has long returned: the blocks then take the context of the forward whose outputs backward has reached
(:func:`_restore_in_backward`).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.autograd import Variable

from mixcompile.errors import ConfigError, check_positive_int
from mixcompile.runtime.hooks import remove_forward_hooks

if TYPE_CHECKING:
    from mixcompile.runtime.blocks.mot import MoTBlock

# The arguments in which a hooked forward takes a key/value cache (or XLNet's / Transformer-XL's memory,
# Reformer's buckets): transformers 5 calls it `cache`, earlier versions `past_key_values` and the like.
CACHE_ARGUMENTS = (
    "cache",
    "past_key_values",
    "past_key_value",
    "past",
    "layer_past",
    "mems",
    "past_buckets_states",
)


@dataclass(frozen=True)
class _Spec:
    """Where a module's forward takes the mask, the tensors that give the batch size, and a cache."""

    mask: str
    inverted: bool  # True where the mask marks padding (PyTorch's key_padding_mask), not tokens
    batch_args: tuple[tuple[str, int], ...]  # (argument, its batch axis); the first one given is used
    cache_args: tuple[str, ...] = ()  # arguments that, given (not None), hold a key/value cache


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
    cache = tuple(name for name in CACHE_ARGUMENTS if name in params)
    # the tokens first: a prepared mask may be broadcast over the batch ([1, 1, T, T])
    return _Spec("attention_mask", False, (*((name, 0) for name in tokens), ("attention_mask", 0)), cache)


def _parts(module: nn.Module, spec: _Spec, blocks: Sequence[MoTBlock]) -> list[tuple[_Spec, list[MoTBlock]]]:
    """Which blocks of a hooked module take which context. One part, but for a Hugging Face encoder-decoder
    model (its forward takes ``decoder_input_ids``, and ``get_encoder()`` gives a submodule): its encoder's
    blocks take ``attention_mask`` (an encoder has no cache), the others (the decoder's) take
    ``decoder_attention_mask`` and the cache. FSMT's decoder, for one, takes no ``attention_mask`` and so is
    not hooked itself: without this its blocks would take the encoder's mask."""
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return [(spec, list(blocks))]
    get_encoder = getattr(module, "get_encoder", None)
    if spec.inverted or "decoder_input_ids" not in params or not callable(get_encoder):
        return [(spec, list(blocks))]
    try:
        encoder = get_encoder()
    except Exception:  # noqa: BLE001 - a model whose lookup fails has no encoder to tell apart
        return [(spec, list(blocks))]
    if not isinstance(encoder, nn.Module) or encoder is module:
        return [(spec, list(blocks))]
    inside = {id(m) for m in encoder.modules()}
    encoder_blocks = [b for b in blocks if id(b) in inside]
    decoder_blocks = [b for b in blocks if id(b) not in inside]
    decoder_inputs = [
        n for n in ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask") if n in params
    ]
    decoder = _Spec(
        "decoder_attention_mask",
        False,
        (*((name, 0) for name in decoder_inputs), *spec.batch_args),
        spec.cache_args,
    )
    encoder_spec = _Spec(spec.mask, spec.inverted, spec.batch_args)
    return [(s, b) for s, b in ((encoder_spec, encoder_blocks), (decoder, decoder_blocks)) if b]


def tokens_of_prepared_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, which of the ``T`` query tokens of a prepared attention mask ``[B, heads or 1, T,
    keys]`` are real (not padding): what a static cache's ``generate`` passes instead of the 2-D mask.

    A real token may attend to itself and a padding token may not (its key is masked, in causal and in
    bidirectional masks alike), so each query's own entry tells. Its own key is query ``i``'s position: ``i``
    without a cache (``T == keys``); with one, the queries are consecutive positions, and a real query's
    last visible key is itself (causal), which places them (any real query will do: every prompt may end in
    padding). Boolean and integer masks allow where True (non-zero), additive ones where they are above half
    the dtype's minimum. A mask broadcast over the batch (``[1, ...]``) gives one row."""
    first = mask[:, 0]
    if first.dtype == torch.bool:
        allowed = first
    elif first.is_floating_point():
        allowed = first > torch.finfo(first.dtype).min / 2
    else:  # 1 / 0
        allowed = first != 0
    batch, queries, keys = allowed.shape
    steps = torch.arange(queries, device=mask.device)
    if queries == keys:
        positions = steps
    else:  # a real query's last visible key is itself: its position; a padding query's is earlier, or none
        key_index = torch.arange(keys, device=mask.device)
        offset = (torch.where(allowed, key_index, -1).amax(-1) - steps).amax()
        positions = (offset + steps).clamp(min=0)
    return allowed.gather(2, positions.expand(batch, queries)[..., None]).squeeze(-1)


class TokenContext(NamedTuple):
    """What a hooked forward (or :func:`token_mask`) was given, as it was given: the mask, the tensor that
    gives the batch size, and whether a key/value cache was given. With a cache the mask may be longer than
    the ``T`` tokens a block sees (``T' >= T``: the cached positions come first); without one it covers the
    block's tokens exactly."""

    mask: torch.Tensor | None  # [B, T'], or a prepared [B or 1, heads or 1, T, keys] mask; None: no mask
    inverted: bool  # the [B, T'] mask marks padding (PyTorch's key_padding_mask), not tokens
    sized: torch.Tensor  # its axis `axis` has the batch size
    axis: int
    cached: bool

    @property
    def batch(self) -> int:
        return self.sized.shape[self.axis]

    def tokens(self) -> torch.Tensor | None:
        """``[B, T']`` bool, which positions are tokens (not padding); None without a mask."""
        if self.mask is None:
            return None
        if self.mask.dim() == 4:
            tokens = tokens_of_prepared_mask(self.mask)
            return tokens.expand(self.batch, -1) if tokens.shape[0] == 1 else tokens  # broadcast over B
        return ~self.mask.bool() if self.inverted else self.mask.bool()


class TokenContextHook:
    """A forward pre-hook (and its matching post-hook) that gives each part's ``blocks`` the module's mask,
    batch size and whether a cache was given, for the duration of its forward. A class, not a closure, so a
    converted model deep-copies and pickles; the argument positions are read from the signature once, so
    the hook traces under ``torch.compile``."""

    def __init__(self, module: nn.Module, parts: Sequence[tuple[_Spec, Sequence[MoTBlock]]]) -> None:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        self.parts = [(spec, list(blocks)) for spec, blocks in parts]
        wanted = {
            name
            for spec, _ in self.parts
            for name in (spec.mask, *(n for n, _ in spec.batch_args), *spec.cache_args)
        }
        self.positions = {name: names.index(name) for name in wanted if name in names}
        self.blocks = [block for _, blocks in self.parts for block in blocks]

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "parts" not in state:  # pickled by mixcompile before parts (one spec for all blocks, no cache)
            state["parts"] = [(state.pop("spec"), state["blocks"])]
        self.__dict__.update(state)

    def _argument(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    def _context(self, spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenContext | None:
        """The context ``spec`` reads from this call; None where nothing says how many sequences."""
        for name, axis in spec.batch_args:
            sized = self._argument(name, args, kwargs)
            if isinstance(sized, torch.Tensor) and sized.dim() > axis:
                break
        else:
            return None
        mask = self._argument(spec.mask, args, kwargs)
        if isinstance(mask, dict):  # transformers' masks per attention type (full, sliding): any will do
            mask = next((m for m in mask.values() if isinstance(m, torch.Tensor)), None)
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            mask = None
        cached = any(self._argument(name, args, kwargs) is not None for name in spec.cache_args)
        return TokenContext(mask, spec.inverted, sized, axis, cached)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for spec, blocks in self.parts:
            context = self._context(spec, args, kwargs)
            for block in blocks:
                if context is None and block.token_context:
                    # nothing says how many sequences: the block keeps what an outer module said (read only
                    # then: a compiled forward guards on what it reads)
                    block.token_context.append(block.token_context[-1])
                else:
                    block.token_context.append(context)

    def done(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        contexts = [(block, block.token_context.pop()) for block in self.blocks]
        _restore_in_backward(contexts, output)


def _restore_in_backward(contexts: list[tuple[MoTBlock, TokenContext | None]], output: Any) -> None:
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
        remove_forward_hooks(module, _is_token_hook)
        spec = _spec(module)
        blocks = [m for m in module.modules() if isinstance(m, MoTBlock)]
        if spec is not None and blocks:
            hook = TokenContextHook(module, _parts(module, spec, blocks))
            module.register_forward_pre_hook(hook, with_kwargs=True)
            module.register_forward_hook(hook.done, with_kwargs=True, always_call=True)


def covered_by_token_hooks(model: nn.Module, path: str) -> bool:
    """Whether a module on the way from ``model`` to ``path`` (both included) would get a token hook."""
    parts = path.split(".") if path else []
    return any(_spec(model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts) + 1))


def _is_token_hook(hook: object) -> bool:
    return isinstance(hook, TokenContextHook) or isinstance(getattr(hook, "__self__", None), TokenContextHook)


def _batch_size(batch: object) -> int | torch.SymInt:
    """``batch`` as a count: an int or integer-like (a numpy integer, a 0-d integer tensor), a symbolic size
    while tracing; never a bool or a float (``int(3.7)`` is 3)."""
    if isinstance(batch, torch.SymInt):
        return batch
    if not isinstance(batch, bool) and hasattr(batch, "__index__"):
        with contextlib.suppress(TypeError):
            batch = operator.index(batch)
    hint = "It is the number of sequences B of the [B*T, d] tokens."
    return check_positive_int("batch", batch, hint=hint)


@contextlib.contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor | None, *, batch: int | None = None) -> Iterator[None]:
    """For hand-written models: every MoT block of ``model`` treats the positions where ``mask [B, T]`` is
    False (0) as padding for the duration of the ``with`` body. ``mask=None`` with ``batch=B`` only says how
    many sequences there are (what a block on flattened ``[B*T, d]`` tokens needs).

    A block that sees fewer than ``T`` tokens per sequence takes the mask's *last* columns, as with a
    key/value cache (the mask covers the cached positions, then the new ones). To mask a block whose tokens
    are not the last ones (a pooled or shortened sequence), call it inside a ``token_mask(block, mask)`` of
    its own tokens: the context entered last applies."""
    from mixcompile.runtime.blocks.mot import MoTBlock

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"token_mask expects a torch.nn.Module (the model or block whose MoT blocks the mask is for), "
            f"got {type(model).__name__}."
        )
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise TypeError(f"mask must be a [batch, seq] tensor, got {getattr(mask, 'shape', type(mask))}.")
    size = None if batch is None else _batch_size(batch)
    if size is not None and mask is not None and size != mask.shape[0]:
        raise ConfigError(f"batch={size} contradicts the mask's {mask.shape[0]} sequences; give one of them.")
    if mask is not None:
        sized = mask
    elif size is not None:
        sized = torch.empty(size, 0)  # a tensor, so that a compiled forward reads a symbolic size
    else:
        raise TypeError("token_mask needs a mask or a batch size.")
    # A given mask is trusted like one given with a cache: a longer mask's last columns are used.
    context = TokenContext(mask, False, sized, 0, True)
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
