"""Real-valued options go through one check, ``mc.check_number``: finite, not a bool, within the bounds,
named with its range in the error. Its copies had drifted (an infinite init_std built NaN weights, True
passed as a temperature, each entry point had its own lowest temperature)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mixcompile as mc


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (True, {}, "x must be a finite number, got True."),
        ("1", {}, "x must be a finite number, got '1'."),
        (math.inf, {}, "x must be a finite number, got inf."),
        (10**400, {"minimum": 0}, f"x must be a finite number >= 0, got {10**400}."),
        (math.nan, {"minimum": 0}, "x must be a finite number >= 0, got nan."),
        (0, {"above": 0}, "x must be a finite number > 0, got 0."),
        (1, {"minimum": 0, "below": 1}, "x must be a finite number >= 0 and < 1, got 1."),
        (1.5, {"maximum": 1}, "x must be a finite number <= 1, got 1.5."),
    ],
)
def test_check_number_refuses_naming_the_option_and_its_range(value, bounds, message) -> None:
    with pytest.raises(mc.ConfigError) as info:
        mc.check_number("x", value, **bounds)
    assert str(info.value) == message


def test_check_number_gives_a_float_of_any_real_number() -> None:
    assert mc.check_number("x", 2, minimum=2) == 2.0 and isinstance(mc.check_number("x", 2), float)
    assert mc.check_number("x", np.float64(0.5), above=0, below=1) == 0.5  # a sweep's grid (a float)
    # numpy's float32 is no float: it failed as JSON when the recipe holding it was saved
    with pytest.raises(mc.ConfigError, match=r"got np.float32\(0.5\)\. Pass a Python number \(float\("):
        mc.check_number("x", np.float32(0.5), above=0, below=1)
    with pytest.raises(mc.ConfigError, match=r"x must be a finite number > 0, got 0\. Or None\.$"):
        mc.check_number("x", 0, above=0, hint="Or None.")


@pytest.mark.parametrize("init_std", [math.inf, math.nan, True, -1.0])
def test_a_mixer_controller_refuses_what_a_router_gate_refuses(init_std) -> None:
    """``init_std=inf`` built a controller of NaN / inf weights; the router's gate refused it."""
    for cls in (mc.ControllerMixer, mc.LearnedRouter):
        with pytest.raises(mc.ConfigError, match=r"^init_std must be a finite number >= 0, got"):
            cls(4, 2, 1, init_std=init_std)


class PlainMixer(nn.Module):
    """A third party's mixer whose temperature is a plain float it does not check."""

    temperature = 1.0


def _plain_block() -> mc.MoTBlock:
    block = mc.MoTBlock(8, 16, 2, group_size=2)
    block.mixer = PlainMixer()
    return block


TEMPERATURE_SETTERS = {
    "softmax mixer": lambda t: mc.MoTBlock(8, 16, 2, group_size=2, mixer_options={"temperature": t}),
    "set_mot_temperature": lambda t: mc.set_mot_temperature(nn.Sequential(_plain_block()), t),
    "schedule start": lambda t: mc.temperature_schedule(0, 10, start=t),
    "schedule end": lambda t: mc.temperature_schedule(0, 10, end=t),
}


@pytest.mark.parametrize("setter", TEMPERATURE_SETTERS)
@pytest.mark.parametrize("bad", [0, 1e-7, math.inf, math.nan, True])
def test_every_temperature_has_one_range(setter, bad) -> None:
    """Each had its own: finite > 0 (set_mot_temperature, the schedule, which took ``start=True``), >= 1e-6
    (the softmax mixer, below which the scaled scores overflow)."""
    name = setter.split()[-1] if setter.startswith("schedule") else "temperature"
    with pytest.raises(mc.ConfigError, match=rf"{name} must be a finite number >= 1e-06, got"):
        TEMPERATURE_SETTERS[setter](bad)


@pytest.mark.parametrize("setter", TEMPERATURE_SETTERS)
def test_the_lowest_temperature_is_taken_everywhere(setter) -> None:
    TEMPERATURE_SETTERS[setter](mc.MIN_TEMPERATURE)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True])
def test_saved_settings_take_the_temperature_the_mixer_had(bad) -> None:
    """What ``settings()`` wrote loads: a third party's mixer may run below MIN_TEMPERATURE (at 1e-7 the
    block saved and then refused to load); only what no mixer could have had is refused."""
    block = _plain_block()
    block.mixer.temperature = 1e-7
    again = _plain_block()
    again.apply_settings(block.settings())
    assert again.mixer.temperature == 1e-7
    with pytest.raises(mc.ConfigError, match=r"temperature must be a finite number > 0, got"):
        again.apply_settings({"temperature": bad})


class _OwnTemperatureMixer(PlainMixer):
    """Computes its temperature itself: a read-only property."""

    @property
    def temperature(self) -> float:
        return 0.5


def test_a_mixer_computing_its_own_temperature_saves_none_and_is_not_set() -> None:
    """Its temperature was saved as a setting, and the load then failed with a bare AttributeError (no
    setter); set_mot_temperature failed the same way."""
    block = mc.MoTBlock(8, 16, 2, group_size=2)
    block.mixer = _OwnTemperatureMixer()
    assert "temperature" not in block.settings()
    block.apply_settings({"temperature": 0.5})  # what be3301f saved of it: its own value, nothing to set
    with pytest.raises(mc.ConfigError, match=r"mixer 'softmax' has no temperature to set"):
        block.apply_settings({"temperature": 0.7})
    with pytest.raises(mc.ConfigError, match=r"computes its temperature itself \(a read-only property\)"):
        mc.set_mot_temperature(nn.Sequential(block), 0.1)


def test_set_temperature_keeps_a_buffer_temperature_in_range() -> None:
    """A temperature kept in a tensor is filled in place, past any setter: the range is checked first."""
    block = _plain_block()
    block.mixer.temperature = torch.tensor(1.0)
    with pytest.raises(mc.ConfigError, match="temperature must be a finite number >= 1e-06"):
        mc.set_mot_temperature(nn.Sequential(block), 1e-9)
    assert float(block.mixer.temperature) == 1.0


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: mc.MoTBlock(8, 16, 4, group_size=2, mode="spares"), mc.UnknownNameError,
         "unknown mode 'spares'. Did you mean 'sparse'? Known: 'soft', 'sparse'."),
        (lambda: mc.MoTBlock(8, 16, 4, group_size=2, small_batch="sparce"), mc.UnknownNameError,
         "unknown small_batch 'sparce'. Did you mean 'sparse'?"),
        (lambda: mc.MoTBlock(8, 16, 4, group_size=2, mode=1), mc.ConfigError,
         "mode must be one of ('soft', 'sparse'), got 1 (int)."),
        (lambda: mc.MoEBlock(8, 16, 4, router_options={"order": "softmax-topk"}), mc.UnknownNameError,
         "unknown order 'softmax-topk'. Did you mean 'softmax_topk'?"),
        (lambda: mc.convert(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), strategy="MoE"),
         mc.UnknownNameError, "unknown strategy 'MoE'. Did you mean 'moe'?"),
    ],
)  # fmt: skip
def test_a_value_outside_an_options_set_is_an_unknown_name_with_the_closest(build, error, message) -> None:
    """Through a block's constructor these were plain ConfigErrors, through convert UnknownNameErrors: one
    check (``mc.check_choice``) for both, and for the built-in plugins' options."""
    with pytest.raises(error) as raised:
        build()
    assert message in str(raised.value)
