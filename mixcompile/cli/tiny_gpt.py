"""Where :mod:`mixcompile.models.tiny_gpt` was until it moved out of the CLI: a TinyGPT pickled before then
(``torch.save(model)``, or a converted model's ``base.pt``) names its classes by this module."""

from mixcompile.models.tiny_gpt import MLP, Block, TinyGPT, build_tiny_gpt

__all__ = ["MLP", "Block", "TinyGPT", "build_tiny_gpt"]
