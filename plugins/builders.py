"""Built-in base-model builders: what a saved manifest may name to rebuild its base without trust flags."""

from __future__ import annotations

from mixcompile import BuilderRegister, build_tiny_gpt, hookimpl


@hookimpl
def register_builders(register: BuilderRegister) -> None:
    register("tiny_gpt", build_tiny_gpt, description="mixcompile's demo byte-level GPT (mixcompile.TinyGPT)")
