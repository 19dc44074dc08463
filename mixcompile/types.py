"""The fixed sets of strings mixcompile's options take, as ``Literal`` types for type checkers.

A bottom layer like :mod:`mixcompile.errors`: it imports nothing from mixcompile. These aliases only
inform type checkers and editors; every option is still checked at run time (with a "did you mean"), so a
value read from a file or a command line is refused the same way whether or not its caller was checked:
the checks read the allowed values from these aliases (``typing.get_args``), so each set is written once.
Names that plugins register (routers, mixers, kernels, initializers, patterns, builders) are open sets:
they stay ``str``.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

#: What a dense FFN becomes: a Mixture-of-Experts or a Mixture-of-Tokens block (``Recipe.strategy``).
Strategy: TypeAlias = Literal["moe", "mot"]

#: The kind of a sparse block (``Block.kind``; what ``Kernel.supports`` is asked about).
BlockKind: TypeAlias = Literal["moe", "mot"]

#: The hidden size of each expert (``Recipe.sizing``): ``same`` as dense, ``split`` = ``h / E``, ``flop``
#: = equal FLOPs per token, ``auto`` = ``split`` for the split initializer, else ``same``.
Sizing: TypeAlias = Literal["auto", "same", "split", "flop"]

#: Which FFN sites to convert (``Recipe.sites``): ``"all"``, ``"last_half"``, ``"every:N"`` (N >= 1; a
#: pattern, so typed ``str``), or a list of site indices.
Sites: TypeAlias = Literal["all", "last_half"] | str | list[int]

#: How a MoT block mixes (``MoTBlock(mode=...)``): ``soft`` (the paper) or ``sparse`` (each expert keeps
#: only its top-weighted group member).
MoTMode: TypeAlias = Literal["soft", "sparse"]

#: What a MoT block does in eval mode with fewer sequences than ``group_size``
#: (``MoTBlock(small_batch=...)``): mix the sequences there are, or switch to sparse mode.
SmallBatchPolicy: TypeAlias = Literal["group", "sparse"]

#: How a MoT block's input holds its tokens (``MoTBlock(layout=...)``): ``[B, T, d]`` (``batch_first``),
#: ``[T, B, d]`` (``seq_first``) or ``[B*T, d]`` (``flat``, the batch size coming from the model's inputs).
TokenLayout: TypeAlias = Literal["batch_first", "seq_first", "flat"]

#: ``Recipe.layout``: ``auto`` (decided from the model at conversion time; first, the default) or a
#: :data:`TokenLayout`.
Layout: TypeAlias = Literal["auto", TokenLayout]

#: The activations of experts and dense FFNs (``StackedExperts(activation=...)``): a fixed set, the
#: functions every kernel computes (whatever spelling a model used, ``nn.GELU(approximate="tanh")``, HF
#: ``NewGELUActivation``, ... is normalised to one of these).
Activation: TypeAlias = Literal[
    "relu", "gelu", "gelu_tanh", "quick_gelu", "silu", "squared_relu", "sigmoid", "tanh", "identity"
]

#: The kinds of things plugins register (``mc.registry().names(kind)``).
PluginKind: TypeAlias = Literal["router", "mixer", "kernel", "initializer", "pattern", "builder"]

__all__ = [
    "Activation",
    "BlockKind",
    "Layout",
    "MoTMode",
    "PluginKind",
    "Sites",
    "Sizing",
    "SmallBatchPolicy",
    "Strategy",
    "TokenLayout",
]
