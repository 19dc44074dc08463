"""The runtime blocks that replace dense FFNs."""

from ._base import Block
from .moe import MoEBlock
from .mot import MoTBlock
from .sizing import flop_matched_hidden

__all__ = ["Block", "MoEBlock", "MoTBlock", "flop_matched_hidden"]
