"""The Mixture-of-Tokens block (Antoniak et al. 2023, arXiv 2310.15961).

Sequences ``b`` of a batch are grouped ``G`` at a time (``b // G`` is the group, ``b % G`` the member);
tokens at the same position in one group are mixed per expert, processed, and spread back. Padding
(the model's ``attention_mask``, seen through :mod:`mixcompile.runtime.tokens`) takes no part in a group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast, get_args

import torch
from torch import nn

from mixcompile.errors import ConfigError, ShapeError, check_choice, check_number, check_positive_int
from mixcompile.plugins.build import build_plugin, call_plugin
from mixcompile.runtime.blocks.base import Block, Describe, check_plugin_options
from mixcompile.runtime.checks import check_mix_plan, check_output
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.mixing import Mixer, settable_temperature
from mixcompile.runtime.tokens import TokenContext
from mixcompile.types import Activation, MoTMode, SmallBatchPolicy, TokenLayout

MODES: tuple[MoTMode, ...] = get_args(MoTMode)
SMALL_BATCH_POLICIES: tuple[SmallBatchPolicy, ...] = get_args(SmallBatchPolicy)
LAYOUTS: tuple[TokenLayout, ...] = get_args(TokenLayout)
_SHAPES = {"batch_first": "[B, T, d]", "seq_first": "[T, B, d]", "flat": "[B*T, d]"}


class MoTBlock(Block):
    """``[B, T, d] -> [B, T, d]``; ``layout="seq_first"`` takes ``[T, B, d]``,
    ``layout="flat"`` takes the ``[B*T, d]`` tokens of ``B`` sequences flattened batch-major (OPT's FFN),
    with ``B`` from the model's forward (see :mod:`mixcompile.runtime.tokens`).

    - ``mode="soft"`` (the paper): every expert sees a softmax-weighted mix of its group.
      ``mode="sparse"``: each expert keeps only its top-weighted member (the tau → 0 limit, i.e. expert
      choice within the group); used for the transition to batch-size-independent inference.
    - A batch not divisible by ``G`` leaves the last group incomplete: its missing members are masked out
      of the softmax (a lone sequence gets weight 1), never padded into it.
    - ``small_batch`` is the policy in eval mode when ``B < G``: ``"group"`` mixes the sequences there are
      (a smaller group), ``"sparse"`` switches to sparse mode.
    - Padding: positions the model's attention mask marks as padding are masked out of their group's
      softmax like missing members (they neither send nor receive a mixture); their output is 0.
    - ``hidden_dropout`` is applied to every expert's hidden activations in training.
    """

    kind = "mot"

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        group_size: int,
        activation: Activation = "gelu",
        gated: bool = False,
        bias: bool = False,
        mixer: str = "softmax",
        mixer_options: Mapping[str, Any] | None = None,
        mode: MoTMode = "soft",
        small_batch: SmallBatchPolicy = "group",
        layout: TokenLayout = "batch_first",
        hidden_dropout: float = 0.0,
        kernel: str = "auto",
        site: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(kernel, site)
        check_positive_int("num_experts", num_experts)
        self.group_size = check_positive_int(
            "group_size", group_size, hint="A group is G tokens at one position from G sequences; use G >= 1."
        )
        check_plugin_options("mixer_options", mixer_options)
        self.mode = mode  # the setters check both
        self.small_batch = small_batch
        self.layout = cast(TokenLayout, check_choice("layout", layout, LAYOUTS))
        # What the forwards of the model's hooked modules were given (None: nothing said how many sequences);
        # the innermost, last one applies.
        self.token_context: list[TokenContext | None] = []
        # The context of the forward a backward is in, for a recomputation there (activation checkpointing).
        self.recompute_context: TokenContext | None = None
        self._forward_had_context = False  # a mask or batch size reached the last forward outside backward
        self.experts = StackedExperts(
            num_experts,
            d_model,
            d_hidden,
            activation=activation,
            gated=gated,
            bias=bias,
            hidden_dropout=hidden_dropout,
            device=device,
            dtype=dtype,
        )
        self.mixer_name = mixer
        self.mixer = build_plugin(
            "mixer",
            mixer,
            d_model,
            num_experts,
            group_size,
            options=mixer_options,
            expected=(nn.Module, Mixer),
            where=site,
        )
        self.mixer.to(device=device, dtype=dtype)
        self._mixer_source = Describe(self, "mixer", mixer)
        self.choose_kernels()

    @property
    def mode(self) -> MoTMode:
        return self._mode

    @mode.setter
    def mode(self, value: MoTMode) -> None:
        """Checked when set (transition tuning sets it on a trained block): a misspelt mode would run as
        soft and be saved."""
        self._mode = cast(MoTMode, check_choice("mode", value, MODES))

    @property
    def small_batch(self) -> SmallBatchPolicy:
        return self._small_batch

    @small_batch.setter
    def small_batch(self, value: SmallBatchPolicy) -> None:
        self._small_batch = cast(SmallBatchPolicy, check_choice("small_batch", value, SMALL_BATCH_POLICIES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = 2 if self.layout == "flat" else 3
        self._check_input(
            x,
            f"{_SHAPES[self.layout]} (MoT mixes tokens across sequences)",
            ok_rank=isinstance(x, torch.Tensor) and x.ndim == rank,
        )
        context = self.token_context[-1] if self.token_context else self.recompute_context
        self._check_recomputation(context)
        xb = self._compute_input(self._batch_major(x, context))
        batch, seq, d = xb.shape
        g = self.group_size
        groups = math.ceil(batch / g)
        missing = groups * g - batch
        present = self._present(context, batch, seq, groups * g, x.device)  # [n*G, T]
        compiling = torch.compiler.is_compiling()
        if compiling:  # whether members are missing, and whether one, would be guards: gather, then zero
            rows = torch.arange(groups * g, device=xb.device)
            xb = torch.where((rows < batch)[:, None, None], xb.index_select(0, rows.clamp(max=batch - 1)), 0)
        elif missing:
            xb = torch.cat([xb, xb.new_zeros(missing, seq, d)])
        x_g = xb.reshape(groups, g, seq, d).permute(2, 0, 1, 3)  # [T, n, G, d]
        present = present.reshape(groups, g, present.shape[-1]).permute(2, 0, 1)  # [T or 1, n, G]
        sparse = self.mode == "sparse" or (not self.training and batch < g and self.small_batch == "sparse")
        plan = call_plugin(self._mixer_source, self.mixer, x_g, present, sparse=sparse)
        shape = (seq, groups, g, self.experts.num_experts)
        check_mix_plan(plan, source=self._mixer_source, shape=shape, present=present)
        choice = self._kernel(x_g)
        y_g = check_output(
            call_plugin(choice.source, choice.kernel.mot, x_g, plan, self.experts), x_g, choice.source
        )
        y = y_g.permute(1, 2, 0, 3).reshape(groups * g, seq, d)
        # eagerly sliced only where members are missing: a slice's backward zero-fills a whole-output gradient
        if compiling or missing:  # compiling first: `missing` is symbolic there, a test of it a guard
            y = y[:batch]
        self._keep_stats(_mixing_stats(plan, groups, missing, choice.name, sparse))
        if self.layout == "flat":
            return y.reshape(x.shape)
        return y if self.layout == "batch_first" else y.transpose(0, 1)

    def _check_recomputation(self, context: TokenContext | None) -> None:
        """A forward inside backward is activation checkpointing recomputing it: without the padding mask
        or batch size its first run had, it would mix differently (wrong gradients), so refuse. Context comes
        back when backward reaches the outputs of the hooked forward or of ``token_mask``'s model, where that
        forward ran eagerly. Compiled, a checkpoint torch.compile traced is recomputed inside the compiled
        backward; one it could not trace (a block keeps statistics: a side effect) is recomputed eagerly,
        and the compiled hooks left nothing to give back."""
        if torch.compiler.is_compiling():
            return
        if torch._C._current_graph_task_id() == -1:
            self._forward_had_context = context is not None and (
                context.mask is not None or self.layout == "flat"
            )
        elif context is None and self._forward_had_context:
            raise ShapeError(
                f"{self._name()} is recomputed in backward (activation checkpointing) without the padding "
                "mask or batch size its forward had. Either backward reached it through no output of the "
                "module that gave them (the converted model's forward, or the model inside "
                "mixcompile.token_mask): compute the loss from that module's outputs. Or that module ran "
                "under torch.compile, which could not trace the checkpoint (its forward has side effects, "
                "such as the statistics a MoT block keeps) and left the recomputation to eager autograd: "
                "set `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True` before "
                "the first compiled call, so that the compiled backward recomputes it (without replaying "
                "the side effects)."
            )

    def _batch_major(self, x: torch.Tensor, context: TokenContext | None) -> torch.Tensor:
        """``x`` as ``[B, T, d]``; flattened tokens take ``B`` from the model's forward."""
        if self.layout == "batch_first":
            return x
        if self.layout == "seq_first":
            return x.transpose(0, 1)
        batch = context.batch if context is not None else 0
        if batch <= 0 or x.shape[0] % batch:
            said = f"the model's forward gave batch size {batch}" if batch else "no batch size was recorded"
            raise ShapeError(
                f"{self._name()} sees {x.shape[0]} flattened tokens [B*T, d] and {said}: call the converted "
                "model itself (its forward records the batch), or wrap the call in "
                "`with mixcompile.token_mask(model, mask)` / `token_mask(model, None, batch=B)`."
            )
        return x.reshape(batch, x.shape[0] // batch, x.shape[1])

    def _present(
        self, context: TokenContext | None, batch: int, seq: int, rows: int, device: torch.device
    ) -> torch.Tensor:
        """``[rows, T or 1]`` bool: which group members are real tokens (not missing, not padding).

        A mask longer than the block's ``T`` tokens is read as covering a key/value cache first (its last
        ``T`` columns are the block's tokens) only where the forward was given a cache, or the mask came
        from :func:`mixcompile.token_mask`; otherwise the block's tokens are not the mask's (a model that
        pools the sequence, as Funnel does), which is fine only when nothing is padded."""
        members = torch.arange(rows, device=device) < batch
        mask = context.tokens() if context is not None else None
        if context is None or mask is None:
            return members[:, None]
        cached = context.cached
        if mask.shape[0] != batch:
            raise ShapeError(
                f"{self._name()} got {batch} sequences, but its padding mask (the attention mask of the "
                f"model's forward, or mixcompile.token_mask's) is {tuple(mask.shape)}: a MoT block needs a "
                "[batch, seq] mask of the sequences it mixes."
            )
        if mask.shape[1] < seq:
            raise ShapeError(
                f"{self._name()} sees {seq} tokens per sequence, more than the {mask.shape[1]} its padding "
                f"mask (the attention mask of the model's forward, or mixcompile.token_mask's; "
                f"{tuple(mask.shape)}) covers, so it cannot tell which of its tokens are padding (the model "
                "may join several streams along the sequence axis, as ProphetNet's decoder does). Hand the "
                "block a mask of its own tokens with `with mixcompile.token_mask(block, mask)` around its "
                "call, or run without a padding mask (all sequences the same length)."
            )
        if mask.shape[1] > seq:
            if not cached:
                # No cache: the block's tokens are not the mask's last columns (the model pools or drops
                # tokens). Without padding every token is present; with padding, which are is unknown.
                refusal = (
                    f"{self._name()} sees {seq} tokens per sequence, fewer than the {mask.shape[1]} of "
                    f"its padding mask {tuple(mask.shape)}, and the model's forward was given no "
                    "key/value cache, so it cannot tell which positions of the mask are its tokens (the "
                    "model pools or drops tokens between layers, as Funnel does). Hand the block a mask "
                    "of its own tokens with `with mixcompile.token_mask(block, mask)` around its call, "
                    "or run without padding (all sequences the same length, no padding in the mask)."
                )
                if torch.compiler.is_compiling():  # no data-dependent branch in a graph: checked on device
                    torch._assert_async(mask.all(), refusal)
                elif not bool(mask.all()):  # a sync, on this branch only
                    raise ShapeError(refusal)
                return members[:, None]
            mask = mask[:, mask.shape[1] - seq :]  # with a cache: the last seq positions are the new tokens
        mask = mask.to(device)
        if torch.compiler.is_compiling() or rows > batch:  # compiling first: `rows > batch` would be a guard
            mask = nn.functional.pad(mask, (0, 0, 0, rows - batch))
        return mask & members[:, None]

    def settings(self) -> dict[str, Any]:
        """Mode, small-batch policy and the mixer's temperature: what transition tuning and inference
        set on a trained block, which a save must keep (and a kernel set since it was built)."""
        settings: dict[str, Any] = {**super().settings(), "mode": self.mode, "small_batch": self.small_batch}
        if settable_temperature(self.mixer):
            settings["temperature"] = self.mixer.temperature
        return settings

    def apply_settings(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - {"kernel", "mode", "small_batch", "temperature"})
        if unknown:
            raise ConfigError(
                f"MoTBlock has no settings {unknown}; it has kernel, mode, small_batch, temperature."
            )
        super().apply_settings({key: value for key, value in settings.items() if key == "kernel"})
        if "mode" in settings:
            self.mode = settings["mode"]
        if "small_batch" in settings:
            self.small_batch = settings["small_batch"]
        if "temperature" in settings:
            temperature = settings["temperature"]
            if not settable_temperature(self.mixer):
                if getattr(self.mixer, "temperature", None) == temperature:  # read-only, saved as it was
                    return
                raise ConfigError(f"mixer {self.mixer_name!r} has no temperature to set.")
            # what settings() wrote: any temperature the mixer took (a third party's may be below 1e-6)
            self.mixer.temperature = check_number("temperature", temperature, above=0)

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}, mixer={self.mixer_name!r}, mode={self.mode!r}, "
            f"small_batch={self.small_batch!r}, layout={self.layout!r}, kernel={self.kernel!r}"
        )


@torch.no_grad()
def _mixing_stats(plan: Any, groups: int, missing: int, kernel_name: str, sparse: bool) -> dict[str, Any]:
    """The entropy as a tensor on the plan's device; :attr:`Block.last_stats` reads it back."""
    entropy = torch.special.entr(plan.merge.float()).sum(dim=2)  # [T, n, E], over group members
    return {
        "kind": "mot",
        "kernel": kernel_name,
        "sparse": sparse,
        "groups": groups,
        "missing_members": missing,
        "merge_entropy": entropy.mean(),
    }
