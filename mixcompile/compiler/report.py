"""What ``inspect`` and ``convert`` tell the user: the sites, what happens to each, and what it costs.

A report is plain data (``to_dict`` is JSON-safe) with a readable ``__str__``: one line per FFN site,
then the sites that cannot be rewritten and why, the modules that could not be traced and why, and
parameters and FFN FLOPs per token before and after.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeAlias

from mixcompile.types import BlockKind, TokenLayout

#: What became of an FFN site: ``planned`` (inspect), ``converted``, ``not selected`` by the recipe, or
#: ``cannot rewrite`` (``SiteReport.reason`` says why).
SiteStatus: TypeAlias = Literal["converted", "planned", "not selected", "cannot rewrite"]

#: Where a site's verification input came from: the FFN's real input on the user's ``example_inputs`` or
#: on inputs built from the model, else ``random`` tensors of its feature size.
ProbeSource: TypeAlias = Literal["example_inputs", "inputs built from the model", "random"]


@dataclass
class SiteReport:
    index: int
    path: str
    pattern: str
    d_model: int
    d_hidden: int
    gated: bool
    bias: bool
    activation: str
    rewrite: str | None
    status: SiteStatus
    reason: str | None = None
    expert_hidden: int | None = None
    kernel: str | None = None
    notes: list[str] = field(default_factory=list)
    max_error: float | None = None
    probe: ProbeSource | None = None  # where the verification input came from
    hidden_dropout: float = 0.0  # the dropout between the projections, applied inside the block
    layout: TokenLayout | None = None  # MoT: the token layout of the FFN input


@dataclass
class BlockReport:
    """A sparse block the model already had when it was inspected or converted."""

    path: str
    kind: BlockKind
    d_model: int
    expert_hidden: int
    num_experts: int
    gated: bool
    activation: str
    kernel: str
    top_k: int | None = None  # MoE
    group_size: int | None = None  # MoT
    router: str | None = None  # MoE: the router plugin's name
    mixer: str | None = None  # MoT: the mixer plugin's name


@dataclass
class ExpertsModuleReport:
    """A Hugging Face experts module (transformers' experts interface) in the model."""

    path: str
    module_class: str
    num_experts: int | None
    implementation: str | None  # config._experts_implementation: "grouped_mm", "eager", "mixcompile", ...
    mixcompile_supported: bool  # whether experts_implementation="mixcompile" can run it
    reason: str | None = None  # why not
    kernel: str | None = None  # the mixcompile kernel it runs (or would run) with on its device and dtype


@dataclass
class Report:
    model: str
    recipe: dict[str, Any]
    sites: list[SiteReport]
    untraced: dict[str, str]
    params_before: int
    params_after: int
    ffn_flops_before: int
    ffn_flops_after: int
    converted: bool = False
    model_max_error: float | None = None
    sparse_blocks: list[BlockReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the conversion as a whole (verification, hooks)
    hf_experts: list[ExpertsModuleReport] = field(default_factory=list)

    @property
    def unrewritable(self) -> list[SiteReport]:
        return [site for site in self.sites if site.status == "cannot rewrite"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        verb = "converted" if self.converted else "would convert"
        chosen = [s for s in self.sites if s.status in ("converted", "planned")]
        already = f"; already sparse: {len(self.sparse_blocks)} blocks" if self.sparse_blocks else ""
        if not self.sites:
            lines = [f"mixcompile report for {self.model}: no dense FFN sites{already}"]
        else:
            lines = [
                f"mixcompile report for {self.model}: {len(self.sites)} FFN sites, {verb} {len(chosen)} "
                f"({self.recipe.get('strategy')}, {self.recipe.get('num_experts')} experts){already}",
                "",
                f"{'#':>3}  {'path':<44} {'pattern':<16} {'d x h':<11} {'act':<10} {'status':<15} rewrite",
            ]
        for s in self.sites:
            shape = f"{s.d_model}x{s.d_hidden}" + ("g" if s.gated else "")
            lines.append(
                f"{s.index:>3}  {s.path:<44} {s.pattern:<16} {shape:<11} {s.activation:<10} {s.status:<15} "
                f"{s.rewrite or '-'}"
            )
            details = [f"expert hidden {s.expert_hidden}"] if s.expert_hidden is not None else []
            details += [f"kernel {s.kernel}"] if s.kernel else []
            details += [f"layout {s.layout}"] if s.layout else []
            details += [f"hidden dropout {s.hidden_dropout} (in the block)"] if s.hidden_dropout else []
            details += [f"max error {s.max_error:.3g} ({s.probe} probe)"] if s.max_error is not None else []
            details += s.notes
            if details:
                lines.append(f"{'':>5}{'; '.join(details)}")
        if self.sparse_blocks:
            lines += ["", "Sparse blocks already in the model:"]
            for b in self.sparse_blocks:
                shape = f"{b.d_model}x{b.expert_hidden}" + ("g" if b.gated else "")
                routing = (
                    f"router {b.router}, top-{b.top_k}"
                    if b.kind == "moe"
                    else f"mixer {b.mixer}, groups of {b.group_size}"
                )
                lines.append(
                    f"  {b.path:<44} {b.kind:<4} {b.num_experts} experts {shape}, {routing}, {b.activation}, "
                    f"kernel {b.kernel}"
                )
        if self.hf_experts:
            lines += ["", "Hugging Face experts modules (experts_implementation):"]
            lines += [f"  {line}" for line in _experts_lines(self.hf_experts)]
            lines.append(
                "  They are sparse already: a conversion rewrites the dense FFN sites listed above (shared "
                "experts, dense layers), not them."
            )
            if any(m.mixcompile_supported and m.implementation != "mixcompile" for m in self.hf_experts):
                lines.append(
                    '  To run them on mixcompile\'s kernels instead: experts_implementation="mixcompile" '
                    "(README: Speeding up an existing MoE model)."
                )
        if self.unrewritable:
            lines += ["", "Sites that cannot be rewritten:"]
            lines += [f"  {s.index} {s.path}: {s.reason}" for s in self.unrewritable]
        if self.untraced:
            lines += [
                "",
                "Modules not traced (their child modules were traced instead, usual for a model's top level "
                "and its attention):",
            ]
            lines += [f"  {path or '<root>'}: {why}" for path, why in self.untraced.items()]
        lines += [
            "",
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
            f"FFN FLOPs per token: {self.ffn_flops_before:,} -> {self.ffn_flops_after:,}",
        ]
        if self.model_max_error is not None:
            lines.append(f"model output max error vs dense: {self.model_max_error:.3g}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _experts_lines(modules: list[ExpertsModuleReport]) -> list[str]:
    """One line per kind of experts module (layers differ only in their index: ``layers.*``)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for m in modules:
        key = (re.sub(r"\.\d+\.", ".*.", m.path), m.module_class, m.num_experts, m.implementation,
               m.mixcompile_supported, m.reason, m.kernel)  # fmt: skip
        groups.setdefault(key, []).append(m.path)
    lines = []
    for (pattern, cls, experts, implementation, supported, reason, kernel), paths in groups.items():
        where = pattern if len(paths) > 1 else paths[0]
        count = f" x{len(paths)}" if len(paths) > 1 else ""
        verdict = f"supported (kernel {kernel})" if supported else f"not supported: {reason}"
        where = f"{where} {cls}{count}, {experts} experts"
        lines.append(f"{where}, implementation {implementation!r}; mixcompile {verdict}")
    return lines
