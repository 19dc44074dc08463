"""The runtime blocks that replace dense FFNs."""

from mixcompile.runtime.blocks.base import Block
from mixcompile.runtime.blocks.moe import MoEBlock
from mixcompile.runtime.blocks.mot import MoTBlock
from mixcompile.runtime.blocks.sizing import flop_matched_hidden

__all__ = ["Block", "MoEBlock", "MoTBlock", "flop_matched_hidden"]
