"""Activation epilogues for the fused kernels: value and derivative, computed in fp32.

Kernels select the function with a ``constexpr`` code, so each activation compiles to straight-line code.
Triton has no ``tanh`` that also runs in the CPU interpreter, so it is built from ``exp``. Named constants
stand to the right of tensors: the interpreter cannot multiply a ``constexpr`` by a tensor.
"""

from __future__ import annotations

from typing import get_args

import triton
import triton.language as tl

from mixcompile import Activation

# The constexpr code of each activation: its place in mixcompile's one list (identity: no epilogue).
CODES: dict[str, int] = {name: code for code, name in enumerate(get_args(Activation))}

_RELU = tl.constexpr(CODES["relu"])
_GELU = tl.constexpr(CODES["gelu"])
_GELU_TANH = tl.constexpr(CODES["gelu_tanh"])
_QUICK_GELU = tl.constexpr(CODES["quick_gelu"])
_SILU = tl.constexpr(CODES["silu"])
_SQUARED_RELU = tl.constexpr(CODES["squared_relu"])
_SIGMOID = tl.constexpr(CODES["sigmoid"])
_TANH = tl.constexpr(CODES["tanh"])

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_QUICK_GELU_SCALE = tl.constexpr(1.702)
# tanh's odd series x + x^3 (c1 + x^2 (c2 + x^2 c3)) below _TANH_SERIES_BELOW, where its truncation error is
# 6e-8 relative at most; the exp form's rounding error is about 6e-8 / |x| relative (3e-7 just above 0.2).
_TANH_SERIES_BELOW = tl.constexpr(0.2)
_TANH_C1 = tl.constexpr(-1.0 / 3.0)
_TANH_C2 = tl.constexpr(2.0 / 15.0)
_TANH_C3 = tl.constexpr(-17.0 / 315.0)


@triton.jit
def _tanh(x):
    """``tanh(x)`` to about 6e-8 absolute: enough where it is added to 1 (GELU's tanh form, the derivative's
    ``1 - tanh²``), not for tanh itself near 0, where ``1 - e^{-2|x|}`` cancels (:func:`_tanh_relative`)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _tanh_relative(x):
    """``tanh(x)`` within a few fp32 ulps, relative, near 0 too: the odd series there. Only the tanh
    activation's value needs that; GELU's tanh form does not, and the series' registers made its gated up
    projection's backward spill (bf16, 32 x 64 tiles, sm_90)."""
    x2 = x * x
    series = x + x * x2 * (x2 * (x2 * _TANH_C3 + _TANH_C2) + _TANH_C1)
    return tl.where(tl.abs(x) < _TANH_SERIES_BELOW, series, _tanh(x))


@triton.jit
def activate(x, ACT: tl.constexpr):
    """``act(x)`` for fp32 ``x``."""
    if ACT == _RELU:
        y = tl.maximum(x, 0.0)
    elif ACT == _GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_HALF))
    elif ACT == _GELU_TANH:
        y = 0.5 * x * (1.0 + _tanh((x + x * x * x * _GELU_CUBIC) * _SQRT_2_OVER_PI))
    elif ACT == _QUICK_GELU:
        y = x * tl.sigmoid(x * _QUICK_GELU_SCALE)
    elif ACT == _SILU:
        y = x * tl.sigmoid(x)
    elif ACT == _SQUARED_RELU:
        r = tl.maximum(x, 0.0)
        y = r * r
    elif ACT == _SIGMOID:
        y = tl.sigmoid(x)
    elif ACT == _TANH:
        y = _tanh_relative(x)
    else:
        y = x
    return y


@triton.jit
def derivative(x, ACT: tl.constexpr):
    """``act'(x)`` for fp32 ``x`` (0 for ReLU at 0, as autograd)."""
    if ACT == _RELU:
        g = tl.where(x > 0, 1.0, 0.0)
    elif ACT == _GELU:
        g = 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == _GELU_TANH:
        t = _tanh((x + x * x * x * _GELU_CUBIC) * _SQRT_2_OVER_PI)
        inner = (1.0 + x * x * _GELU_CUBIC * 3.0) * _SQRT_2_OVER_PI
        g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner
    elif ACT == _QUICK_GELU:
        s = tl.sigmoid(x * _QUICK_GELU_SCALE)
        g = s + x * _QUICK_GELU_SCALE * s * (1.0 - s)
    elif ACT == _SILU:
        s = tl.sigmoid(x)
        g = s * (1.0 + x * (1.0 - s))
    elif ACT == _SQUARED_RELU:
        g = 2.0 * tl.maximum(x, 0.0)
    elif ACT == _SIGMOID:
        s = tl.sigmoid(x)
        g = s * (1.0 - s)
    elif ACT == _TANH:
        t = _tanh(x)
        g = 1.0 - t * t
    else:
        g = tl.full(x.shape, 1.0, tl.float32)
    return g
