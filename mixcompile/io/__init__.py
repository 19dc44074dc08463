"""Saving, loading and reading models from paths; every file treated as untrusted input.

What runs when: loading runs installed code only (mixcompile, its plugins, transformers). A manifest that
needs anything else (an importable function, a pickle, a config that loads code) is refused unless the
caller passes ``trust_code`` / ``trust_pickle``.
"""

from mixcompile.io.files import output_directory
from mixcompile.io.loading import load
from mixcompile.io.reading import LoadedModel, read_model
from mixcompile.io.saving import save

__all__ = ["LoadedModel", "load", "output_directory", "read_model", "save"]
