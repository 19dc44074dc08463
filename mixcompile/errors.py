"""Exceptions raised by mixcompile.

Every error names the offending argument, plugin or module and, where one exists, says how to fix it.
They subclass the built-in exception a user would catch anyway (``ValueError`` for bad values,
``TypeError`` for wrong types, ``KeyError``-free lookups), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

_E = TypeVar("_E", bound="MixcompileError")


class MixcompileError(Exception):
    """Base class of every error mixcompile raises on purpose."""

    def prefixed(self: _E, context: str) -> _E:
        """The same error (same type, same fields) with ``context: `` in front of its message, for
        re-raising with where it happened (a site, a plugin) without losing what it was."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = (f"{context}: {self}",)
        return clone


class ConfigError(MixcompileError, ValueError):
    """An argument or option has a value that cannot work."""


class ShapeError(MixcompileError, ValueError):
    """A tensor given to a block has the wrong rank, size or dtype (or, under the debug checks, NaN / inf
    values)."""


class PluginError(MixcompileError):
    """A plugin raised, or returned something malformed. The message names the plugin."""


class VerificationError(MixcompileError):
    """A conversion whose recipe preserves the dense model's function computed something else: a rewrite
    changed more than the FFN (the model is left as it was)."""


class LoadError(MixcompileError):
    """A path that cannot be read as a model, or a saved model that is refused: names the file and why."""


class UnknownNameError(ConfigError):
    """A router / mixer / kernel / initializer / pattern name that no plugin registered, or a value outside
    an option's fixed set (``kind`` is then the option: ``mode``, ``sizing``, ...)."""

    def __init__(self, kind: str, name: str, known: Iterable[str] = ()) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        close = close or [k for k in known if k.lower() == name.lower()]  # 'MoE': closeness is case-sensitive
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(repr(k) for k in known) or "(none registered)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {listing}.")
        self.kind, self.name, self.known, self.suggestion = kind, name, known, close[0] if close else None


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Validate an option with a fixed set of values, naming it: anything else raises
    :class:`UnknownNameError` with the closest value."""
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__}).")
    raise UnknownNameError(name, value, choices)


def check_positive_int(
    name: str, value: object, *, minimum: int = 1, maximum: int | None = None, hint: str = ""
) -> int:
    """Validate an integer option, naming it in the error (bools are refused: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).{_sp(hint)}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.{_sp(hint)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}.{_sp(hint)}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """Validate a real-valued option against inclusive (``minimum``, ``maximum``) and exclusive (``above``,
    ``below``) bounds, naming it and its range in the error. Always finite (an inf or NaN weight spreads NaN
    through the model) and never a bool (``True`` is not a temperature)."""
    bounds = {">=": minimum, ">": above, "<=": maximum, "<": below}
    stated = {sign: bound for sign, bound in bounds.items() if bound is not None}
    try:
        # Python numbers only: a numpy float32 passes as a number and fails as JSON when a recipe is saved
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number) or not all(_COMPARE[sign](number, bound) for sign, bound in stated.items()):
        limits = " and ".join(f"{sign} {bound}" for sign, bound in stated.items())
        if isinstance(value, numbers.Real) and not isinstance(value, bool | int | float):
            hint = f"{hint} Pass a Python number (float({value!r}): options are saved as JSON).".strip()
        raise ConfigError(f"{name} must be a finite number{_sp(limits)}, got {value!r}.{_sp(hint)}")
    return number


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


def check_bool(name: str, value: object) -> bool:
    """Validate an on/off option, naming it in the error: a string such as ``"false"`` or ``"no"`` (a
    hand-written recipe, ``--router-option renormalize=False``) is truthy, so it would turn the option on."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)  # numpy's booleans (a config read with numpy, a sweep's grid)
    hint = " In JSON true or false, unquoted; in Python True or False." if isinstance(value, str) else ""
    raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).{hint}")


def warn(message: str) -> None:
    """``warnings.warn`` pointed at the user's line: the first caller past the calling package's innermost
    frames (a plugin's) and mixcompile's, its built-in plugins', pluggy's and torch's. A fixed
    ``stacklevel`` is wrong for a warning given inside a forward (it points into torch's module-call
    machinery) or reached by more than one path (``convert`` from Python and from the CLI)."""
    frame, level = sys._getframe(1), 2
    caller = _package_path(frame.f_globals.get("__name__", ""))
    # The calling package's innermost frames, then mixcompile's and torch's: the user's own package may
    # hold the plugin too, and its line calling the model is the one to show.
    for skipped in (caller, _internal_paths()):
        while skipped and frame.f_back is not None and frame.f_code.co_filename.startswith(skipped):
            frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _internal_paths() -> tuple[str, ...]:
    names = ("mixcompile", "mixcompile_plugins", "pluggy", "torch")
    return tuple(path for name in names for path in _package_path(name))


def _package_path(module_name: str) -> tuple[str, ...]:
    """The folder of ``module_name``'s top-level package (its file for a lone module; each of its folders for
    a namespace package, which has no ``__init__.py`` and so no file; nothing for a script run as
    ``__main__``, which is the user's)."""
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    if top == "__main__":
        return ()
    if not file:
        return tuple(os.path.join(folder, "") for folder in getattr(module, "__path__", ()))
    return (os.path.dirname(file) + os.sep,) if os.path.basename(file) == "__init__.py" else (file,)


def _sp(hint: str) -> str:
    return f" {hint}" if hint else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
