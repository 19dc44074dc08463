"""Built-in MoT mixer: the paper's per-expert softmax over the group."""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

import torch

from mixcompile import (
    MIN_TEMPERATURE,
    ControllerMixer,
    MixerRegister,
    MixPlan,
    check_choice,
    check_number,
    hookimpl,
)

EmitMode: TypeAlias = Literal["merge", "experts"]
EMIT_MODES: tuple[EmitMode, ...] = get_args(EmitMode)


class SoftmaxMixer(ControllerMixer):
    """``merge = softmax_G(W_c x / temperature)`` per expert over the group's present members.

    ``emit="merge"`` (the paper) spreads each expert's output back with the merge weights.
    ``emit="experts"`` uses, per token, a softmax over experts instead (of the scores ``W_c x`` without the
    temperature, which is the group softmax's: annealing it towards the sparse limit changes how each
    expert's input is merged, not how a token weighs the experts); each token's emit weights then sum to 1,
    so with G = 1 an upcycled block computes exactly the dense FFN.
    In sparse mode the merge weights become one-hot on each expert's top member (temperature → 0).
    Members that are not present (missing from a short last group, or padding) get weight 0 in both; a
    position where no member is present mixes nothing (all weights 0, no NaN).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        group_size: int,
        *,
        temperature: float = 1.0,
        emit: EmitMode = "merge",
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts, group_size, init_std=init_std)
        check_choice("emit", emit, EMIT_MODES)
        self.temperature = temperature
        self.emit = emit

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        """Checked whenever set (annealing sets it every step): below ``MIN_TEMPERATURE`` the logits
        overflow to inf and the mix is NaN; ``mode="sparse"`` is the limit towards 0."""
        self._temperature = check_number(
            "temperature", value, minimum=MIN_TEMPERATURE, hint="mode='sparse' is the limit towards 0."
        )

    def forward(self, x_g: torch.Tensor, present: torch.Tensor, *, sparse: bool) -> MixPlan:
        scores = self.logits(x_g)  # [T, n, G, E]
        # The temperature is the group softmax's (merge), not emit's; at 1 it costs no pass (nor backward).
        logits = scores if self.temperature == 1.0 else scores / self.temperature
        member_mask = present[..., None]  # [n, G] or [T, n, G] -> broadcasts over [T, n, G, E]
        # A position whose members are all absent would be a softmax over nothing (NaN, and NaN gradients
        # through any later masking): its logits stay finite and its weights are zeroed below.
        anyone = member_mask.any(dim=-2, keepdim=True)
        masked = logits.masked_fill(~member_mask & anyone, float("-inf"))
        if sparse:
            top = masked.argmax(dim=2, keepdim=True)
            merge = torch.zeros_like(logits).scatter_(2, top, 1.0) * member_mask
        else:
            merge = torch.softmax(masked, dim=2) * member_mask
        if self.emit == "merge":
            emit = merge
        else:
            emit = torch.softmax(scores, dim=-1) * member_mask
            if sparse:
                emit = emit * merge
        dtype = x_g.dtype
        return MixPlan(merge.to(dtype), emit.to(dtype))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, emit={self.emit!r}"


@hookimpl
def register_mixers(register: MixerRegister) -> None:
    register("softmax", SoftmaxMixer, description="per-expert softmax over the group (Antoniak et al. 2023)")
