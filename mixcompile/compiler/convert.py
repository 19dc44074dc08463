"""``convert`` and ``inspect``: the passes put together.

trace -> find sites -> choose (recipe) -> probe (one forward of the model's inputs: real FFN inputs and,
for MoT, each site's token layout) -> build blocks -> rewrite (+ MoT token hooks) -> verify. ``inspect``
stops before building real blocks and changes nothing. ``convert`` works on a deep copy unless
``inplace=True``; in both cases a failure (an option that does not fit a site, a block that breaks shapes)
leaves the model as it was: blocks are all built before the first rewrite, and rewrites and hooks are
undone if verification fails. Models that say what they take (Hugging Face configs, the tiny GPT) are
probed and verified with inputs built from themselves when the user gives none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from mixcompile.compiler.build import (
    Replacement,
    build_replacement,
    dense_flops,
    existing_block_flops,
    function_preserving,
)
from mixcompile.compiler.choose import select_sites
from mixcompile.compiler.find import FFNSite, Scan, find_ffns
from mixcompile.compiler.layout import AUTO_BATCH, auto_inputs, batch_size, decide_layout, observed_layout
from mixcompile.compiler.pattern import Pattern
from mixcompile.compiler.recipe import Recipe, make_recipe, record
from mixcompile.compiler.report import (
    BlockReport,
    ExpertsModuleReport,
    ProbeSource,
    Report,
    SiteReport,
    SiteStatus,
)
from mixcompile.compiler.rewrite import Assignment, apply, assignments, choose_rewrites
from mixcompile.compiler.verify import (
    SiteCheck,
    capture_inputs,
    check_site,
    disagreement,
    evaluation,
    output_error,
    random_probe,
    run_model,
)
from mixcompile.errors import (
    ConfigError,
    MixcompileError,
    ShapeError,
    VerificationError,
    check_bool,
    first_line,
    warn,
)
from mixcompile.plugins.build import build_plugin
from mixcompile.plugins.manager import registry
from mixcompile.runtime.blocks import MoEBlock, MoTBlock
from mixcompile.runtime.calls import install_forward_scope
from mixcompile.runtime.introspect import sparse_blocks
from mixcompile.runtime.tokens import install_token_hooks
from mixcompile.types import TokenLayout

ModelT = TypeVar("ModelT", bound=nn.Module)  # convert returns the model's own class


def find_sites(model: nn.Module, patterns: list[Pattern] | None = None) -> Scan:
    """Trace ``model`` and return its FFN sites in model order, each with its rewrite or the reasons it
    has none: the find and rewrite-choosing passes together."""
    scan = find_ffns(model, patterns)
    choose_rewrites(scan, model)
    return scan


def inspect(model: nn.Module, recipe: Recipe | Mapping[str, Any] | None = None, **options: Any) -> Report:
    """What ``convert`` would do with these options: sites, rewrites, untraced modules, sizes. Changes
    nothing (blocks are built on the meta device only to count their parameters; for MoT, one forward on
    inputs built from the model decides token layouts, as in ``convert``). A model without dense FFNs (an
    already converted one, say) gives a report with no sites rather than an error."""
    _check_model(model)
    recipe = make_recipe(recipe, options, where="inspect")
    scan = find_sites(model)
    # no dense FFN left: nothing for ``sites`` to pick from, the same empty report as without it
    selected = select_sites(recipe, scan.sites) if scan.sites else []
    rewritable = [site for site in selected if site.rewrite is not None]
    layouts, notes = _inspect_layouts(model, recipe, rewritable)
    plans = [
        build_replacement(site, recipe, meta=True, layout=layouts.get(site.index)) for site in rewritable
    ]
    before = _count_params(model)
    after = before - sum(p.params_before for p in plans) + sum(p.params_after for p in plans)
    report = _report(model, recipe, scan, plans, {}, before, after, _describe_blocks(model), converted=False)
    report.notes.extend(notes)
    return report


def _inspect_layouts(
    model: nn.Module, recipe: Recipe, sites: list[FFNSite]
) -> tuple[dict[int, TokenLayout], list[str]]:
    """MoT token layouts decided as ``convert`` decides them, so inspect reports (or refuses) what convert
    would: from a forward on inputs built from the model where it has weights (not on the meta device)."""
    if recipe.strategy != "mot" or not sites:
        return {}, []
    real = not any(p.is_meta for p in model.parameters())
    probe = _Probe(model, sites, None, needed=real)
    layouts = {site.index: decide_layout(site, recipe, probe.layout(site), model) for site in sites}
    return layouts, probe.notes


def convert(
    model: ModelT,
    recipe: Recipe | Mapping[str, Any] | None = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    example_inputs: Any = None,
    **options: Any,
) -> ModelT:
    """Replace the dense FFNs of ``model`` with MoE / MoT blocks; returns the converted model.

    ``convert(model, strategy="mot", num_experts=8)`` or ``convert(model, recipe)`` (keywords override the
    recipe's fields; see :class:`Recipe`). By default ``model`` is deep-copied and left untouched; with
    ``inplace=True`` it is modified and returned. ``example_inputs`` (a tensor, tuple of positional
    arguments or dict of keyword arguments) makes verification use real FFN inputs and compare the whole
    model's output; models that say what they take (Hugging Face configs) get such inputs built from
    themselves when none are given. Use :func:`convert_with_report` to also get the :class:`Report`.
    """
    converted, _ = convert_with_report(
        model, recipe, inplace=inplace, verify=verify, example_inputs=example_inputs, **options
    )
    return converted


def convert_with_report(
    model: ModelT,
    recipe: Recipe | Mapping[str, Any] | None = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    example_inputs: Any = None,
    **options: Any,
) -> tuple[ModelT, Report]:
    """:func:`convert`, also returning the report (with the verification errors per site)."""
    _check_model(model)
    check_bool("inplace", inplace)  # "no" is truthy: it would convert the caller's model in place
    check_bool("verify", verify)
    recipe = make_recipe(recipe, options)
    target = model if inplace else _copy(model)
    scan, pattern_of = _scan(target)
    selected = select_sites(recipe, scan.sites)
    rewritable = [site for site in selected if site.rewrite is not None]
    if not selected:
        chosen = f"sites={recipe.sites!r}" + (" with filter_fn" if recipe.filter_fn is not None else "")
        raise ConfigError(
            f"{chosen} selects none of the {len(scan.sites)} FFN sites of {type(model).__name__}; "
            "`mixcompile inspect` (or mixcompile.inspect) lists them by index."
        )
    if not rewritable:
        raise ConfigError(
            f"none of the {len(selected)} selected FFN sites of {type(model).__name__} can be rewritten: "
            + "; ".join(f"{site.label}: {site.reason}" for site in selected)
        )
    for site in selected:
        if site.rewrite is None:
            warn(f"FFN site {site.index} at {site.label!r} is left dense: {site.reason}")
    mot = recipe.strategy == "mot"
    # A replay with verification off and the layout recorded (mixcompile.load) needs no probe forward.
    probe = _Probe(target, rewritable, example_inputs, needed=verify or (mot and recipe.layout == "auto"))
    layouts: dict[int, TokenLayout] = {}
    if mot:
        for site in rewritable:
            observed = probe.layout(site)
            layouts[site.index] = decide_layout(site, recipe, observed, target)
    progress = tqdm(rewritable, desc="building blocks", unit="site", disable=None, leave=False)  # TTY only
    plans = [build_replacement(site, recipe, layout=layouts.get(site.index)) for site in progress]
    for plan in plans:
        plan.block.train(plan.site.unit.module.training)
    _warn_if_not_causal(target, recipe, plans)
    before = _count_params(target)
    existing = _describe_blocks(target)
    changes = assignments(target, [(plan.site, plan.block) for plan in plans])
    restore = apply(target, changes)
    _install_hooks(target, mot=mot)
    try:
        checks, model_error, mismatch = _verify(target, recipe, plans, probe, verify)
        if mismatch is not None:
            restore = _confirm_mismatch(target, probe, plans, changes, restore, mismatch, mot=mot)
            model_error = None  # the dense model itself varies: nothing to compare with
    except BaseException:
        restore()
        _install_hooks(target, mot=mot)  # back to the hooks the restored model's own blocks need
        raise
    after = _count_params(target)
    report = _report(
        target, recipe, scan, plans, checks, before, after, existing, converted=True, calls=probe.calls
    )
    report.model_max_error = model_error
    report.notes.extend(probe.notes)
    converted = [plan.site.index for plan in plans]
    patterns = [pattern_of[index] for index in converted]
    record(target, recipe, converted, [layouts[i] for i in sorted(layouts)], patterns)
    from mixcompile.io.hf import install_save_pretrained  # io depends on the compiler, not the reverse

    install_save_pretrained(target)  # so save_pretrained writes a directory nothing reads as the dense model
    return target, report


def _copy(model: ModelT) -> ModelT:
    """The copy ``convert`` works on, or a ``MixcompileError`` saying why there is none and what to do."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any failure is the model's: say so, with the way around it
        raise MixcompileError(
            f"{type(model).__name__} cannot be copied for conversion (copy.deepcopy failed: "
            f"{type(exc).__name__}: {first_line(exc)}); pass inplace=True to convert the model itself."
        ) from exc


def _warn_if_not_causal(model: nn.Module, recipe: Recipe, plans: list[Replacement]) -> None:
    """A router that says it is not causal (expert choice) routes a position by the tokens after it: fine for
    an encoder, not for a model that generates (a decoded token then goes to every expert with room: a
    function training never computed)."""
    routers = [getattr(plan.block, "router", None) for plan in plans]
    if any(not getattr(router, "causal", True) for router in routers) and _generates(model):
        warn(
            f"router {recipe.router!r} is not causal: in {type(model).__name__}, which generates, a "
            "position's routing depends on the positions after it, and generate() computes what training "
            "never saw. Use a token-choice router (topk, switch, hash) for decoders."
        )


def _generates(model: nn.Module) -> bool:
    """Whether ``model`` decodes token by token: transformers says so with ``can_generate()`` (its models
    without a head have none that works), any other model by having a ``generate`` method (the tiny GPT
    mixcompile builds, a user's own decoder)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        return bool(can_generate())
    return callable(getattr(model, "generate", None))


class _Probe:
    """One forward of the unconverted model on the user's ``example_inputs`` or, where the model says what
    it takes, on inputs built from it: each site's real FFN input (its shape shows the token layout) and
    the output to compare the converted model with. A failure on the user's inputs is an error; on built
    inputs it only means no forward verification, which the report says."""

    def __init__(self, model: nn.Module, sites: list[FFNSite], example_inputs: Any, *, needed: bool) -> None:
        self.inputs = example_inputs
        self.source: ProbeSource = "example_inputs"
        self.captured: dict[int, Any] = {}
        self.calls: dict[int, int] = {}  # how many times each site's module ran in the forward
        self.reference: Any = None
        self.notes: list[str] = []
        self.batch: int | None = None
        if self.inputs is None and needed:
            self.inputs, self.source = auto_inputs(model), "inputs built from the model"
        if self.inputs is None:
            return
        try:
            self.captured, self.calls, self.reference = capture_inputs(model, sites, self.inputs)
        except Exception as exc:
            if self.source == "example_inputs":
                raise MixcompileError(
                    f"the unconverted {type(model).__name__} failed on example_inputs: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.notes.append(
                f"no forward verification: the unconverted model failed on inputs built from it "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
            self.inputs = None
            return
        # inputs built here have a known batch size; a user's are read by their (Hugging Face) names
        self.batch = AUTO_BATCH if self.source != "example_inputs" else batch_size(self.inputs)

    def layout(self, site: FFNSite) -> TokenLayout | None:
        captured = self.captured.get(site.index)
        return None if captured is None else observed_layout(tuple(captured.shape), self.batch)


def _verify(
    model: nn.Module, recipe: Recipe, plans: list[Replacement], probe: _Probe, verify: bool
) -> tuple[dict[int, SiteCheck], float | None, str | None]:
    """Each site's check, the converted model's largest output difference from the dense one, and, when
    every block preserves its FFN's function, how the outputs disagree beyond rounding (``None`` if they
    agree)."""
    if not verify or any(plan.site.ffn.w_in.is_meta for plan in plans):
        return {}, None, None  # a model on the meta device has structure, no values: nothing to run
    preserved = {plan.site.index: function_preserving(plan) for plan in plans}
    preserving = all(preserved.values())
    checks = {}
    for plan in plans:
        index = plan.site.index
        if index in probe.captured:
            x, source, batch = probe.captured[index], probe.source, probe.batch
        else:
            x, source = random_probe(plan, recipe), "random"
            batch = x.shape[0]
            if getattr(plan.block, "layout", None) == "flat":
                x = x.reshape(-1, x.shape[-1])
        checks[index] = check_site(plan, x, preserving=preserved[index], source=source, batch=batch)
    if probe.inputs is None:
        return checks, None, None
    try:
        after = _run_on_probe(model, probe, "converted")
    except MixcompileError as exc:
        if probe.source == "example_inputs" or not isinstance(exc.__cause__, ShapeError):
            raise
        # The built inputs pad one position; a MoT block may refuse a padding it cannot place (a model
        # that pools its sequence): the converted model runs on unpadded batches, padded ones get that error.
        probe.notes.append(f"no model-level verification: on padded inputs built from it, {exc.__cause__}")
        return checks, None, None
    if not preserving:
        return checks, None, None
    return checks, output_error(probe.reference, after), disagreement(probe.reference, after)


def _run_on_probe(model: nn.Module, probe: _Probe, which: str) -> Any:
    try:
        with evaluation(model):
            return run_model(model, probe.inputs)
    except Exception as exc:
        raise MixcompileError(
            f"the {which} {type(model).__name__} failed on {probe.source}: {type(exc).__name__}: {exc}"
        ) from exc


def _confirm_mismatch(
    model: nn.Module,
    probe: _Probe,
    plans: list[Replacement],
    changes: list[Assignment],
    restore: Callable[[], None],
    mismatch: str,
    *,
    mot: bool,
) -> Callable[[], None]:
    """Raise :class:`VerificationError` for a converted model that computes something else than the dense
    one, unless the dense model itself does (randomness in eval mode): then note it and keep the conversion.
    Returns the restore function of the conversion kept."""
    restore()
    _install_hooks(model, mot=mot)
    repeat = disagreement(probe.reference, _run_on_probe(model, probe, "unconverted"))
    if repeat is None:
        sites = ", ".join(
            f"{plan.site.index} ({plan.site.rewrite.describe()})" for plan in plans if plan.site.rewrite
        )
        raise VerificationError(
            f"converting {type(model).__name__} changed more than its FFNs: the blocks preserve the dense "
            f"model's function (every block alone computes its FFN), but on {probe.source} the converted "
            f"model's {mismatch}. A rewrite also changed something the FFN shares with other code. Sites: "
            f"{sites}. Convert fewer sites (sites=[...]) to find it; verify=False keeps the result unchecked."
        )
    probe.notes.append(
        "no model-level verification: the unconverted model's output differs between two eval forwards on "
        f"{probe.source} ({repeat})"
    )
    restore = apply(model, changes)
    _install_hooks(model, mot=mot)
    return restore


def _install_hooks(model: nn.Module, *, mot: bool) -> None:
    """The hooks a converted model's forward runs: one scope for what its blocks keep (router losses,
    statistics) and, with MoT blocks, their token context (padding mask, batch size)."""
    install_forward_scope(model)
    if mot:
        install_token_hooks(model)


def _check_model(model: object) -> None:
    """An ``nn.Module`` that ``torch.fx`` can trace, or a ``TypeError`` saying what to pass instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{type(model).__name__} is a TorchScript module: scripting compiled its FFNs into a TorchScript "
            "graph with no nn.Linear modules left to swap. Convert the Python nn.Module, then script the "
            "result."
        )
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "this is a torch.compile wrapper: convert the model it wraps (model._orig_mod), then compile the "
            "converted model."
        )
    if isinstance(model, nn.Module):
        return
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError(
            "this is a torch.export program: export flattens the model to ATen operations, leaving no FFN "
            "modules to swap. Convert the nn.Module, then export the converted model."
        )
    if isinstance(model, type) and issubclass(model, nn.Module):
        hint = f"pass an instance, e.g. convert({model.__name__}(...))"
    elif isinstance(model, Mapping):
        hint = "this looks like a state_dict: load it into its model and pass the model"
    else:
        hint = "pass a torch.nn.Module (the model to convert or inspect)"
    raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}; {hint}.")


def _scan(model: nn.Module) -> tuple[Scan, dict[int, str]]:
    """The model's FFN sites, and the registered name of the pattern that found each (by site index)."""
    patterns = registered_patterns()
    scan = find_sites(model, list(patterns.values()))
    if not scan.sites:
        untraced = f" {len(scan.trace.failures)} modules could not be traced." if scan.trace.failures else ""
        raise ConfigError(
            f"no FFN found in {type(model).__name__}: nothing matched the registered patterns "
            f"({', '.join(patterns) or 'none'}).{untraced} "
            "print(mixcompile.inspect(model)) lists the modules that could not be traced and why; a custom "
            "FFN shape can be taught with a pattern plugin (`mixcompile plugins` lists the registered ones)."
        )
    name_of = {id(pattern): name for name, pattern in patterns.items()}
    return scan, {site.index: name_of[id(site.finder)] for site in scan.sites}


def registered_patterns() -> dict[str, Pattern]:
    """Every registered pattern, built, by the name it is registered under (which a save records: a
    pattern's own ``name`` attribute may differ)."""
    return {name: build_plugin("pattern", name, expected=Pattern) for name in registry().names("pattern")}


def _describe_blocks(model: nn.Module) -> list[tuple[BlockReport, int]]:
    """The sparse blocks ``model`` already has, each with its FLOPs per token."""
    described = []
    for path, block in sparse_blocks(model).items():
        if not isinstance(block, MoEBlock | MoTBlock):
            continue
        experts = block.experts
        report = BlockReport(
            path=path,
            kind=block.kind,
            d_model=experts.d_model,
            expert_hidden=experts.d_hidden,
            num_experts=experts.num_experts,
            gated=experts.gated,
            activation=experts.activation,
            kernel=block.kernel_for(experts.w_in.device, experts.w_in.dtype),
            top_k=block.top_k if isinstance(block, MoEBlock) else None,
            group_size=block.group_size if isinstance(block, MoTBlock) else None,
            router=block.router_name if isinstance(block, MoEBlock) else None,
            mixer=block.mixer_name if isinstance(block, MoTBlock) else None,
        )
        described.append((report, existing_block_flops(block)))
    return described


def _describe_hf_experts(model: nn.Module) -> list[ExpertsModuleReport]:
    """The Hugging Face experts modules of ``model`` and the experts implementation each uses."""
    from mixcompile.integrations.transformers_experts import describe_experts_module, experts_modules

    reports = []
    for path, module in experts_modules(model):
        info = describe_experts_module(module)
        reports.append(
            ExpertsModuleReport(
                path=path,
                module_class=type(module).__name__,
                num_experts=getattr(module, "num_experts", None),
                implementation=info["implementation"],
                mixcompile_supported=info["supported"],
                reason=info["reason"],
                kernel=info["kernel"],
            )
        )
    return reports


def _experts_implementation_notes(model: nn.Module) -> list[str]:
    """A note where the model asks for mixcompile's experts implementation and has no experts module that
    uses transformers' experts interface: the setting does nothing there (Llama 4's experts, for one)."""
    from mixcompile.integrations.transformers_experts import IMPLEMENTATION, experts_modules

    implementation = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if implementation != IMPLEMENTATION or any(True for _ in experts_modules(model)):
        return []
    return [
        f"experts_implementation={implementation!r} is set, but no module of {type(model).__name__} uses "
        "transformers' experts interface, so it runs nothing here"
    ]


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _report(
    model: nn.Module,
    recipe: Recipe,
    scan: Scan,
    plans: list[Replacement],
    checks: dict[int, SiteCheck],
    params_before: int,
    params_after: int,
    existing: list[tuple[BlockReport, int]],
    *,
    converted: bool,
    calls: Mapping[int, int] | None = None,
) -> Report:
    """``calls``: how many times each site's module ran in one forward (where a forward was run; a module
    shared by several layers counts once per layer in the FLOPs), else once."""
    runs = {site.index: max(1, (calls or {}).get(site.index, 1)) for site in scan.sites}
    by_site = {plan.site.index: plan for plan in plans}
    rows = []
    for site in scan.sites:
        plan, check = by_site.get(site.index), checks.get(site.index)
        status: SiteStatus
        if site.rewrite is None:
            status = "cannot rewrite"
        elif plan is not None:
            status = "converted" if converted else "planned"
        else:
            status = "not selected"
        rows.append(
            SiteReport(
                index=site.index,
                path=site.label,
                pattern=site.pattern,
                d_model=site.ffn.d_model,
                d_hidden=site.ffn.d_hidden,
                gated=site.ffn.gated,
                bias=site.ffn.has_bias,
                activation=site.ffn.activation,
                rewrite=site.rewrite.describe() if site.rewrite else None,
                status=status,
                reason=site.reason,
                expert_hidden=plan.d_hidden if plan else None,
                kernel=plan.kernel if plan else None,
                notes=list(site.notes)
                + ([f"runs {runs[site.index]} times per forward"] if runs[site.index] > 1 else []),
                max_error=check.max_error if check else None,
                probe=check.source if check else None,
                hidden_dropout=site.hidden_dropout,
                layout=getattr(plan.block, "layout", None) if plan else None,
            )
        )
    flops_before = sum(plan.flops_before * runs[plan.site.index] for plan in plans)
    unchanged = sum(
        dense_flops(site.ffn) * runs[site.index] for site in scan.sites if site.index not in by_site
    )
    unchanged += sum(flops for _, flops in existing)
    return Report(
        model=type(model).__name__,
        recipe=recipe.to_dict(),
        sites=rows,
        untraced=dict(scan.trace.failures),
        params_before=params_before,
        params_after=params_after,
        ffn_flops_before=flops_before + unchanged,
        ffn_flops_after=sum(plan.flops_after * runs[plan.site.index] for plan in plans) + unchanged,
        converted=converted,
        sparse_blocks=[block for block, _ in existing],
        hf_experts=_describe_hf_experts(model),
        notes=_experts_implementation_notes(model),
    )
