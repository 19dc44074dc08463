"""What a module's own Python code reads, for code no trace recorded.

A rewrite may empty a module's members or replace its ``forward``; both are safe only if no code the
traces did not see uses what changes (a forward that does not trace, a grad-mode context around the FFN).
Reading the bytecode of the class's methods is how the rewrites find out.
"""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Iterable, Iterator

from torch import nn

_LOADS_ATTRIBUTE = ("LOAD_ATTR", "LOAD_METHOD")


def method_codes(owner: nn.Module, methods: Iterable[str]) -> Iterator[types.CodeType]:
    """The code of the owner's class's ``methods`` (decorators unwrapped), and the code nested in it
    (inner functions, comprehensions)."""
    pending = [getattr(inspect.unwrap(getattr(type(owner), m)), "__code__", None) for m in methods]
    while pending:
        code = pending.pop()
        if isinstance(code, types.CodeType):
            yield code
            pending.extend(code.co_consts)


def names_read(owner: nn.Module, methods: Iterable[str]) -> set[str]:
    """Every global or attribute name the code of the owner's ``methods`` reads (nested code too)."""
    return {name for code in method_codes(owner, methods) for name in code.co_names}


def attributes_used(owner: nn.Module, methods: Iterable[str], through: bool) -> set[str]:
    """Attribute names the code of the owner's ``methods`` loads; without ``through``, not those only
    loaded to read one of their own attributes (``self.linear1.weight``)."""
    used = set()
    for code in method_codes(owner, methods):
        instructions = list(dis.get_instructions(code))
        used |= {
            str(here.argval)
            for here, after in zip(instructions, [*instructions[1:], None], strict=True)
            if here.opname in _LOADS_ATTRIBUTE and (through or after is None or after.opname != "LOAD_ATTR")
        }
    return used
