"""The Mixture-of-Tokens block (Antoniak et al. 2023, arXiv 2310.15961).

Sequences ``b`` of a batch are grouped ``G`` at a time (``b // G`` is the group, ``b % G`` the member);
tokens at the same position in one group are mixed per expert, processed, and spread back.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from mixcompile.errors import ConfigError, check_positive_int
from mixcompile.plugins.build import build_plugin, call_plugin
from mixcompile.runtime.blocks.base import Block
from mixcompile.runtime.checks import check_mix_plan, check_output
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.mixing import Mixer
from mixcompile.types import MoTMode, SmallBatchPolicy

MODES = ("soft", "sparse")
SMALL_BATCH_POLICIES = ("group", "sparse")


class MoTBlock(Block):
    """``[B, T, d] -> [B, T, d]`` (``[T, B, d]`` with ``batch_first=False``).

    - ``mode="soft"`` (the paper): every expert sees a softmax-weighted mix of its group.
      ``mode="sparse"``: each expert keeps only its top-weighted member (the tau → 0 limit, i.e. expert
      choice within the group); used for the transition to batch-size-independent inference.
    - A batch not divisible by ``G`` leaves the last group incomplete: its missing members are masked out
      of the softmax (a lone sequence gets weight 1), never padded into it.
    - ``small_batch`` is the policy in eval mode when ``B < G``: ``"group"`` mixes the sequences there are
      (a smaller group), ``"sparse"`` switches to sparse mode.
    """

    kind = "mot"

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        group_size: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = False,
        mixer: str = "softmax",
        mixer_options: Mapping[str, Any] | None = None,
        mode: MoTMode = "soft",
        small_batch: SmallBatchPolicy = "group",
        batch_first: bool = True,
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
        _check_choice("mode", mode, MODES)
        _check_choice("small_batch", small_batch, SMALL_BATCH_POLICIES)
        self.mode = mode
        self.small_batch = small_batch
        self.batch_first = bool(batch_first)
        self.experts = StackedExperts(
            num_experts,
            d_model,
            d_hidden,
            activation=activation,
            gated=gated,
            bias=bias,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = "[B, T, d]" if self.batch_first else "[T, B, d]"
        self._check_input(
            x,
            f"{layout} (MoT mixes tokens across sequences)",
            ok_rank=isinstance(x, torch.Tensor) and x.ndim == 3,
        )
        xb = self._compute_input(x if self.batch_first else x.transpose(0, 1))
        batch, seq, d = xb.shape
        g = self.group_size
        groups = math.ceil(batch / g)
        missing = groups * g - batch
        if missing:
            xb = torch.cat([xb, xb.new_zeros(missing, seq, d)])
        x_g = xb.reshape(groups, g, seq, d).permute(2, 0, 1, 3)  # [T, n, G, d]
        present = (torch.arange(groups * g, device=x.device) < batch).reshape(groups, g)
        sparse = self.mode == "sparse" or (not self.training and batch < g and self.small_batch == "sparse")
        mixer_source = self._source("mixer", self.mixer_name)
        plan = call_plugin(mixer_source, self.mixer, x_g, present, sparse=sparse)
        check_mix_plan(plan, source=mixer_source, shape=(seq, groups, g, self.experts.num_experts))
        kernel_name, kernel = self._kernel(x_g)
        kernel_source = self._source("kernel", kernel_name)
        y_g = check_output(
            call_plugin(kernel_source, kernel.mot, x_g, plan, self.experts), x_g, kernel_source
        )
        y = y_g.permute(1, 2, 0, 3).reshape(groups * g, seq, d)[:batch]
        self._stats = _mixing_stats(plan, groups, missing, kernel_name, sparse)
        return y if self.batch_first else y.transpose(0, 1)

    def settings(self) -> dict[str, Any]:
        """Mode, small-batch policy and the mixer's temperature: what transition tuning and inference
        set on a trained block, which a save must keep."""
        settings: dict[str, Any] = {"mode": self.mode, "small_batch": self.small_batch}
        temperature = getattr(self.mixer, "temperature", None)
        if isinstance(temperature, float):
            settings["temperature"] = temperature
        return settings

    def apply_settings(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - {"mode", "small_batch", "temperature"})
        if unknown:
            raise ConfigError(f"MoTBlock has no settings {unknown}; it has mode, small_batch, temperature.")
        if "mode" in settings:
            self.mode = cast(MoTMode, _check_choice("mode", settings["mode"], MODES))
        if "small_batch" in settings:
            policy = _check_choice("small_batch", settings["small_batch"], SMALL_BATCH_POLICIES)
            self.small_batch = cast(SmallBatchPolicy, policy)
        if "temperature" in settings:
            temperature = settings["temperature"]
            if not isinstance(getattr(self.mixer, "temperature", None), float):
                raise ConfigError(f"mixer {self.mixer_name!r} has no temperature to set.")
            if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
                raise ConfigError(f"temperature must be a number > 0, got {temperature!r}.")
            self.mixer.temperature = float(temperature)

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}, mixer={self.mixer_name!r}, mode={self.mode!r}, "
            f"small_batch={self.small_batch!r}, kernel={self.kernel!r}"
        )


@torch.no_grad()
def _mixing_stats(plan: Any, groups: int, missing: int, kernel_name: str, sparse: bool) -> dict[str, Any]:
    """The entropy as a tensor on the plan's device; :attr:`Block.last_stats` reads it back."""
    merge = plan.merge.float()
    entropy = -(merge * torch.log(merge.clamp_min(1e-30))).sum(dim=2)  # [T, n, E], over group members
    return {
        "kind": "mot",
        "kernel": kernel_name,
        "sparse": sparse,
        "groups": groups,
        "missing_members": missing,
        "merge_entropy": entropy.mean(),
    }


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.{hint}")
    return str(value)
