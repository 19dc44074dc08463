"""Models mixcompile builds itself, from code alone: the tiny GPT of the demo, the examples and the tests
(``mixcompile.TinyGPT``; the built-in ``tiny_gpt`` builder, so a saved one loads without trusted code)."""

from mixcompile.models.tiny_gpt import TinyGPT, build_tiny_gpt

__all__ = ["TinyGPT", "build_tiny_gpt"]
