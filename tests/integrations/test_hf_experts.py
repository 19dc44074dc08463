"""mixcompile as an experts implementation of transformers (``experts_implementation="mixcompile"``).

The reference is transformers' own ``eager`` experts forward (the loop each model class defines), run on the
same module with fresh random inputs: outputs and every gradient must agree (fp32, relative error < 1e-4,
NaN fails). Families are enumerated from transformers' model sources, not listed by hand: every experts
class behind ``use_experts_implementation`` is built from a tiny config and checked; a family that cannot
be built, or that mixcompile refuses, must fail in the way :data:`EXPECTED` records (a test fails when the
reason changes, so nothing is skipped silently).
``PYTHONPATH=tests python tests/integrations/test_hf_experts.py`` prints the table.

Triton runs in its CPU interpreter without a GPU (imported with ``TRITON_INTERPRET=1`` as in
``test_compile.py``); it is slow there, so the default run checks it on every distinct layout (the flag
matrix) and on a few families, and ``-m slow`` checks every family with it.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from triton_setup import import_triton

import mixcompile as mc
from mixcompile.integrations import experts_layout, register_transformers_experts
from mixcompile.integrations.transformers_experts import experts_forward, experts_view

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # fp32, relative to the scale of each tensor


# ------------------------------------------------------------------------------------------------ Triton


NO_TRITON = import_triton(DEVICE)
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
KERNELS = ["torch", pytest.param("triton", marks=needs_triton)]

# transformers' experts module imports Triton where it is installed: only after Triton is set up.
transformers = pytest.importorskip("transformers")
moe = pytest.importorskip(
    "transformers.integrations.moe", reason="transformers without the experts interface"
)
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

MODELS_DIR = Path(transformers.__file__).parent / "models"


@pytest.fixture(scope="module", autouse=True)
def setup():
    """Names for each kernel (``mixcompile`` is ``auto``), and the interpreter for ``kernel="triton"``."""
    for kernel in ("auto", "torch", "triton"):
        register_transformers_experts(impl(kernel), kernel=kernel)
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        yield


def impl(kernel: str) -> str:
    return "mixcompile" if kernel == "auto" else f"mixcompile_{kernel}"


# ----------------------------------------------------------------------------------------------- checks


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to ``TOL`` relative to the tensor's scale; NaN or inf anywhere fails."""
    assert torch.isfinite(expected).all(), f"{what}: the eager reference is not finite"
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual, expected, rtol=TOL, atol=TOL * scale + 1e-12, msg=lambda m: f"{what}: {m}"
    )


# ------------------------------------------------------------------------------------- family discovery

# Sizes for tiny configs; a key is set only where the family's config has it.
SHRINK: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 24, "shared_experts_intermediate_size": 24,
    "shared_intermediate_size": 24, "moe_shared_expert_intermediate_size": 24, "dense_intermediate_size": 48,
    "moe_hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "head_dim": 8, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "top_k_experts": 2, "moe_k": 2, "n_group": 1,
    "num_expert_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "max_position_embeddings": 128, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16, "index_head_dim": 8,
    "index_n_heads": 2, "index_topk": 8, "sliding_window": 16, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 2, "linear_head_dim": 8, "linear_num_heads": 2, "swa_num_attention_heads": 4,
    "swa_head_dim": 8, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_num_heads": 4,
    "mamba_head_dim": 8, "ssm_state_size": 8, "mamba_chunk_size": 16, "chunk_size": 16, "n_groups": 1,
    "n_shared_experts": 1, "moe_topk": 2, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8,
}  # fmt: skip
# What a family needs beyond SHRINK to build small with at least one MoE layer.
OVERRIDES: dict[str, dict[str, Any]] = {
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "granitemoehybrid": {"mamba_n_heads": 8, "layer_types": ["mamba", "attention"]},
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 1,
        "expert_layer_offset": 0,
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    "gemma4": {"enable_moe_block": True},
    "glm4v_moe": {  # mrope sections that fit the tiny head
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        "partial_rotary_factor": 1.0,
    },
    "mistral4": {
        "head_dim": 16,
        "qk_head_dim": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    },
    "glm5_next": {"index_topk": 16},
    "zaya": {"num_experts_per_tok": 1},
}

# Every family whose tiny model is not checked end to end, and why (a substring of the error it raises).
# A family listed as "refused" builds, and mixcompile refuses it with that message.
EXPECTED: dict[str, tuple[str, str]] = {
    "gpt_oss": ("refused", "own `_apply_gate`"),
    "openai_privacy_filter": ("refused", "own `_apply_gate`"),
    "minimax_m3_vl": ("refused", "own `_apply_gate`"),
    "hy_v4": ("refused", "own `_apply_gate`"),
    "deepseek_v4": ("refused", "own `_apply_gate`"),
    "beam": ("refused", "own `_apply_gate`"),
    "muse_spark": ("refused", "has_post_expert_norm"),
    "inkling2": ("refused", "own `_apply_gate`"),
    "inkling2_loop": ("refused", "own `_apply_gate`"),
    "glm5_next": ("refused", "own `_apply_gate`"),
    "hy_v4_vl": ("refused", "own `_apply_gate`"),
}
# Families whose tiny model cannot be built or run here (error substring); their experts modules are
# still checked on their own (test_experts_module_matches_eager) where the experts class builds.
UNBUILDABLE: dict[str, str] = {
    "ernie4_5_vl_moe": "its experts class does not build",
    "glm5_next": "its experts class does not build",
    "hy_v4_vl": "its experts class does not build",
    "inkling": "must match the size",  # attention shapes need family-specific head settings
    "inkling2": "must match the size",
    "inkling2_loop": "must match the size",
    "mimo_v2_flash": "must match the size",
    "qwen4_exp": "unsupported operand",  # its sparse-attention indexer needs token_budget settings
}
# Experts classes that cannot be built from any tiny config of their family (error substring).
NO_EXPERTS_MODULE: dict[str, str] = {
    "ernie4_5_vl_moe": "moe_intermediate_size",  # text and vision experts sized by one list
    "glm5_next": "Expecting NoPE",  # its config validation wants attention sizes the tiny config lacks
    "hy_v4_vl": "mrope_section",
}
# MoE families transformers ships that do not use the experts interface (experts_implementation does
# nothing for them), and so cannot run through it.
NOT_ON_INTERFACE = {
    "dbrx": "DbrxExperts loops over per-expert weight chunks in its own forward",
    "doge": "DogeCDMoE: a cross-domain MoE with its own forward",
    "jetmoe": "JetMoeParallelExperts (MoA attention experts and MoE MLP) has its own forward",
    "llama4": "Llama4TextExperts runs a bmm over all experts in its own forward",
    "longcat_flash": "LongcatFlashExperts (with zero-compute experts) has its own forward",
    "nllb_moe": "encoder-decoder with nn.ModuleList experts (Top2Router)",
    "step3p7": "Step3p7Experts is not decorated with use_experts_implementation",
    "switch_transformers": "encoder-decoder with nn.ModuleDict experts",
    "vitpose_backbone": "a vision backbone with per-dataset expert MLPs",
}
# Families whose model is compiled whole (torch.compile, fullgraph) and run with Triton by default.
CORE = ["mixtral", "qwen3_moe", "deepseek_v3", "nemotron_h"]


def interface_families() -> list[str]:
    """Families whose modeling file uses the experts interface (read from the sources: no imports)."""
    return sorted(
        path.parent.name
        for path in MODELS_DIR.glob("*/modeling_*.py")
        if path.name == f"modeling_{path.parent.name}.py"
        and "@use_experts_implementation" in path.read_text(encoding="utf-8")
    )


FAMILIES = interface_families()


@dataclass
class Family:
    name: str
    experts: list[type]  # the experts classes of the family
    config: dict[type, PretrainedConfig | str]  # experts class -> tiny config, or why none builds
    model: nn.Module | None = None
    model_error: str | None = None


def _experts_classes(module: Any) -> list[type]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__ and is_experts_class(value)
    ]


def is_experts_class(cls: type) -> bool:
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and code.co_filename == moe.__file__


def tiny_config(family: str, cls: type[PretrainedConfig]) -> PretrainedConfig:
    """``cls`` shrunk: SHRINK where the config has the key; per-layer lists of layer kinds shortened to one
    layer of each kind; then the family's OVERRIDES."""
    default = cls().to_dict()
    options = {key: value for key, value in SHRINK.items() if key in default}
    layers = default.get("num_hidden_layers")
    per_layer = {}
    for key, value in default.items():
        if key in options or not isinstance(layers, int) or layers <= 2 or not isinstance(value, (list, str)):
            continue
        kinds = list(dict.fromkeys(value))
        if len(value) == layers and len(kinds) <= 4:  # layer kinds; per-layer indices are left to the config
            per_layer[key] = (kinds, type(value))
    n = max([2] + [len(kinds) for kinds, _ in per_layer.values()])
    if "num_hidden_layers" in options:
        options["num_hidden_layers"] = n
    for key, (kinds, kind) in per_layer.items():
        sequence = [kinds[min(i, len(kinds) - 1)] for i in range(n)]
        options[key] = "".join(sequence) if kind is str else sequence
    options.update(OVERRIDES.get(family, {}))
    return cls(**options)


def load_family(name: str) -> Family:
    modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    configuration = importlib.import_module(f"transformers.models.{name}.configuration_{name}")
    config_classes = [
        value
        for value in vars(configuration).values()
        if isinstance(value, type)
        and issubclass(value, PretrainedConfig)
        and value.__module__ == configuration.__name__
    ]
    family = Family(name, _experts_classes(modeling), {})
    for experts_class in family.experts:
        errors = []
        for config_class in config_classes:
            try:
                config = tiny_config(name, config_class)
                with torch.device("meta"):
                    experts_class(config)
            except Exception as exc:  # noqa: BLE001 - try the next config class
                errors.append(f"{config_class.__name__}: {type(exc).__name__}: {exc}".replace("\n", " "))
                continue
            family.config[experts_class] = config
            break
        else:
            family.config[experts_class] = "; ".join(errors) or "the family has no config class"
    _build_model(family, modeling)
    return family


def _build_model(family: Family, modeling: Any) -> None:
    """The family's smallest whole model (a CausalLM where there is one) holding its first experts class."""
    experts_class = family.experts[0]
    config = family.config[experts_class]
    if isinstance(config, str):
        family.model_error = f"its experts class does not build: {config}"
        return
    candidates = [
        value
        for value in vars(modeling).values()
        if isinstance(value, type) and issubclass(value, PreTrainedModel)
        and value.__module__ == modeling.__name__
        and value.config_class is type(config) and not value.__name__.endswith("PreTrainedModel")
    ]  # fmt: skip
    candidates.sort(
        key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__)
    )
    if not candidates:
        family.model_error = f"no model class takes {type(config).__name__}"
        return
    try:
        torch.manual_seed(0)
        model = candidates[0](copy.deepcopy(config)).eval()
        with torch.no_grad():
            model(input_ids=torch.randint(3, 128, (1, 4)))
    except Exception as exc:  # noqa: BLE001 - recorded and compared with UNBUILDABLE
        family.model_error = f"{candidates[0].__name__}: {type(exc).__name__}: {exc}".replace("\n", " ")
        return
    if not any(isinstance(m, experts_class) for m in model.modules()):
        family.model_error = (
            f"{candidates[0].__name__} built from the tiny config has no {experts_class.__name__}"
        )
        return
    family.model = model


_loaded: dict[str, Family] = {}


def family(name: str) -> Family:
    if name not in _loaded:
        _loaded[name] = load_family(name)
    return _loaded[name]


# ------------------------------------------------------------------------------------- running modules


def fill_(module: nn.Module, seed: int) -> None:
    """Fresh random parameters (biases large enough to matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            std = 0.5 if name.endswith("bias") else 1.0 / max(param.shape[-1], 1) ** 0.5
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)


def routing(n: int, num_experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing: distinct experts per token, softmax weights (as routers give them)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.rand(n, num_experts, generator=generator).topk(k, dim=-1).indices
    weights = torch.randn(n, k, generator=generator).softmax(-1)
    return index.to(DEVICE), weights.to(DEVICE)


def run_experts(module: nn.Module, implementation: str, x, index, weights) -> dict[str, torch.Tensor]:
    """Output and the gradients of input, routing weights and every parameter, through ``implementation``."""
    module.config._experts_implementation = implementation
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    y = module(x, index, weights)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    (y * probe).sum().backward()
    results = {"output": y.detach(), "grad hidden_states": x.grad, "grad top_k_weights": weights.grad}
    results.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return results


def compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    assert actual.keys() == expected.keys(), where
    for key, value in expected.items():
        assert value is not None and actual[key] is not None, f"{where}: no {key}"
        check_close(actual[key], value, f"{where} {key}")


def check_experts_class(fam: Family, experts_class: type, kernel: str) -> None:
    config = fam.config[experts_class]
    assert not isinstance(config, str)
    module = experts_class(copy.deepcopy(config)).to(DEVICE)
    fill_(module, seed=len(fam.name))
    d = experts_layout_or_none(module)
    n, k = 10, min(getattr(config, "num_experts_per_tok", 2) or 2, module.num_experts)
    x = torch.randn(
        n, module.gate_up_proj.shape[-1] if d is None else d, generator=torch.Generator().manual_seed(3)
    )
    index, weights = routing(n, module.num_experts, k, seed=4)
    status, reason = EXPECTED.get(fam.name, ("ok", ""))
    if status == "refused":
        with pytest.raises(mc.ConfigError, match=re.escape(reason)) as info:
            run_experts(module, impl(kernel), x.to(DEVICE), index, weights)
        assert experts_class.__name__ in str(info.value)
        return
    expected = run_experts(module, "eager", x.to(DEVICE), index, weights)
    compare(run_experts(module, impl(kernel), x.to(DEVICE), index, weights), expected, experts_class.__name__)


def experts_layout_or_none(module: nn.Module) -> int | None:
    """``d_model`` of an experts module mixcompile accepts; ``None`` for one it refuses."""
    try:
        return experts_layout(module).d_model
    except mc.ConfigError:
        return None


def run_model(model: nn.Module, implementation: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits (or last hidden states) and every parameter gradient, through ``implementation``."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11)).to(logits)
    (logits * probe).sum().backward()
    results = {"logits": logits.detach()}
    results.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return results


def check_model(fam: Family, kernel: str, generate: bool) -> None:
    status, reason = EXPECTED.get(fam.name, ("ok", ""))
    if fam.name in UNBUILDABLE:
        assert fam.model is None and UNBUILDABLE[fam.name] in str(fam.model_error), fam.model_error
        return
    assert fam.model is not None, f"{fam.name}: {fam.model_error}"
    model = copy.deepcopy(fam.model).to(DEVICE)
    fill_(model, seed=len(fam.name))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    if status == "refused":
        with pytest.raises(mc.ConfigError, match=re.escape(reason)) as info:
            run_model(model, impl(kernel), ids)
        assert fam.experts[0].__name__ in str(info.value)
        return
    expected = run_model(model, "eager", ids)
    actual = run_model(model, impl(kernel), ids)
    expert_grads = [key for key in expected if re.search(r"experts\.(gate_up|up|down)_proj", key)]
    assert expert_grads, f"{fam.name}: no expert parameter got a gradient"
    assert all(expected[key].abs().sum() > 0 for key in expert_grads)
    compare(actual, expected, type(model).__name__)
    if generate and hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
        prompt = ids[:1]
        tokens = {}
        for implementation in ("eager", impl(kernel)):
            model.set_experts_implementation(implementation)
            with torch.no_grad():
                tokens[implementation] = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip
        assert tokens["eager"].shape[-1] == prompt.shape[-1] + 5
        assert torch.equal(tokens[impl(kernel)], tokens["eager"])


def _slow_unless_core(name: str) -> Any:
    return pytest.param(name, marks=()) if name in CORE else pytest.param(name, marks=pytest.mark.slow)


# --------------------------------------------------------------------------------------------- families


def test_family_lists_are_complete_and_current() -> None:
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"} <= set(
        FAMILIES
    )
    for name in (*EXPECTED, *UNBUILDABLE, *OVERRIDES, *CORE):
        assert name in FAMILIES, f"{name} no longer uses transformers' experts interface"
    for name in NOT_ON_INTERFACE:
        path = MODELS_DIR / name / f"modeling_{name}.py"
        assert path.exists() and "@use_experts_implementation" not in path.read_text(encoding="utf-8"), name


@pytest.mark.parametrize("name", FAMILIES)
def test_experts_module_matches_eager(name: str) -> None:
    """Every experts class, on its own: mixcompile (torch kernel) equals eager, or is refused as recorded."""
    fam = family(name)
    for experts_class in fam.experts:
        config = fam.config[experts_class]
        if isinstance(config, str):
            assert name in NO_EXPERTS_MODULE and NO_EXPERTS_MODULE[name] in config, config
            continue
        check_experts_class(fam, experts_class, "torch")


@pytest.mark.parametrize("name", [_slow_unless_core(n) for n in FAMILIES])
@needs_triton
def test_experts_module_triton(name: str) -> None:
    fam = family(name)
    for experts_class in fam.experts:
        if not isinstance(fam.config[experts_class], str):
            check_experts_class(fam, experts_class, "triton")


@pytest.mark.parametrize("name", FAMILIES)
def test_model_matches_eager(name: str) -> None:
    """The whole tiny model: logits, every gradient and generate() equal eager's (kernel="auto")."""
    check_model(family(name), "auto" if DEVICE == "cuda" else "torch", generate=True)


@pytest.mark.parametrize("name", [_slow_unless_core(n) for n in FAMILIES])
@needs_triton
def test_model_triton(name: str) -> None:
    check_model(family(name), "triton", generate=False)


# ------------------------------------------------------------------------------------------ every layout

E, D, H = 4, 16, 12


def toy_experts(*, gate: bool, concatenated: bool, transposed: bool, bias: bool, act: str = "silu"):
    """An experts class with the given flags whose eager forward is a plain per-pair loop written from what
    the flags mean (independent of both transformers' and mixcompile's implementations)."""
    from transformers.activations import ACT2FN

    @moe.use_experts_implementation(
        is_concatenated=concatenated, is_transposed=transposed, has_bias=bias, has_gate=gate
    )
    class ToyExperts(nn.Module):
        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__()
            self.num_experts = E
            rows = 2 * H if gate else H
            up = "gate_up_proj" if gate else "up_proj"
            setattr(self, up, nn.Parameter(torch.empty((E, D, rows) if transposed else (E, rows, D))))
            self.down_proj = nn.Parameter(torch.empty((E, H, D) if transposed else (E, D, H)))
            if bias:
                setattr(self, f"{up}_bias", nn.Parameter(torch.empty(E, rows)))
                self.down_proj_bias = nn.Parameter(torch.empty(E, D))
            self.act_fn = ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            w_up = self.gate_up_proj if gate else self.up_proj
            w_up, w_down = (w_up.mT, self.down_proj.mT) if transposed else (w_up, self.down_proj)
            b_up = (self.gate_up_proj_bias if gate else self.up_proj_bias) if bias else None
            rows = []
            for t in range(hidden_states.shape[0]):
                y = torch.zeros_like(hidden_states[t])
                for j in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, j])
                    z = w_up[e] @ hidden_states[t] + (b_up[e] if bias else 0)
                    if gate:
                        g, u = (z[:H], z[H:]) if concatenated else (z[0::2], z[1::2])
                        mid = self.act_fn(g) * u
                    else:
                        mid = self.act_fn(z)
                    out = w_down[e] @ mid + (self.down_proj_bias[e] if bias else 0)
                    y = y + top_k_weights[t, j] * out
                rows.append(y)
            return torch.stack(rows)

    module = ToyExperts(PretrainedConfig()).to(DEVICE)
    fill_(module, seed=1)
    return module


LAYOUTS = [
    dict(gate=g, concatenated=c, transposed=t, bias=b)
    for g in (True, False)
    for c in ((True, False) if g else (True,))
    for t in (False, True)
    for b in (False, True)
]


def _layout_id(layout: dict[str, bool]) -> str:
    return "-".join(name if on else f"no_{name}" for name, on in layout.items())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_every_layout_flag_is_honoured(layout: dict[str, bool], kernel: str) -> None:
    module = toy_experts(**layout)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    index, weights = routing(9, E, 2, seed=3)
    expected = run_experts(module, "eager", x, index, weights)
    compare(run_experts(module, impl(kernel), x, index, weights), expected, _layout_id(layout))
    if layout["concatenated"]:  # transformers' own batched_mm agrees too (it always splits gate/up halves)
        compare(run_experts(module, "batched_mm", x, index, weights), expected, "batched_mm")


class _AtenOps(TorchDispatchMode):
    """The ATen ops that run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


GATED_LAYOUTS = [layout for layout in LAYOUTS if layout["gate"] and not layout["bias"]]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", GATED_LAYOUTS, ids=_layout_id)
def test_fused_gate_up_gradient_is_built_without_copies(layout: dict[str, bool], kernel: str) -> None:
    """The gate and up halves of ``gate_up_proj`` get one gradient, not two zero-filled full-size ones
    summed (autograd's slice backward): the Triton kernel writes the halves of one tensor laid out like
    the weight, which becomes the parameter's ``.grad`` as it is; other kernels' two gradients are joined
    with one copy. Memory is NaN-filled when allocated, so a half left unwritten fails the comparison."""
    module = toy_experts(**layout)
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    index, weights = routing(11, E, 2, seed=9)
    expected = run_experts(module, "eager", x, index, weights)
    module.config._experts_implementation = impl(kernel)
    module.zero_grad(set_to_none=True)
    written: list[int] = []  # where the Triton kernel's backward put the fused gradient
    with pytest.MonkeyPatch.context() as mp:
        if kernel == "triton":
            ops = importlib.import_module("mixcompile_plugins.triton.ops")

            def spy(w_in: torch.Tensor, w_gate: torch.Tensor | None) -> Any:
                halves = ops_fused_halves(w_in, w_gate)
                written.append(-1 if halves is None else halves[0]._base.data_ptr())
                return halves

            ops_fused_halves = ops._fused_halves
            mp.setattr(ops, "_fused_halves", spy)
        mp.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            y = module(x.clone().requires_grad_(), index, weights.clone().requires_grad_())
            with _AtenOps() as aten:
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y))
        finally:
            torch.use_deterministic_algorithms(deterministic)
    grad = module.gate_up_proj.grad
    check_close(grad, expected["grad gate_up_proj"], f"{_layout_id(layout)} {kernel}")
    assert grad.stride() == module.gate_up_proj.stride()
    assert "slice_backward" not in aten.names, str(aten.names)
    joins = [name for name in aten.names if name in ("cat", "stack")]
    if kernel == "triton":
        assert written == [grad.data_ptr()] and not joins, str(aten.names)
    else:
        assert len(joins) == 1, str(aten.names)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu2", "relu", "quick_gelu", "gelu_new"])
def test_activation_of_the_module_is_used(act: str) -> None:
    module = toy_experts(gate=True, concatenated=True, transposed=False, bias=False, act=act)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    index, weights = routing(7, E, 2, seed=5)
    compare(
        run_experts(module, impl("torch"), x, index, weights),
        run_experts(module, "eager", x, index, weights),
        act,
    )


def test_an_identity_activation_is_computed() -> None:
    module = toy_experts(gate=False, concatenated=True, transposed=False, bias=True, act="linear")
    module.act_fn = nn.Identity()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    index, weights = routing(7, E, 2, seed=5)
    compare(
        run_experts(module, impl("torch"), x, index, weights),
        run_experts(module, "eager", x, index, weights),
        "identity",
    )


def test_views_share_the_module_parameters() -> None:
    """No copies: every tensor the kernel gets lies in the storage of a parameter of the module."""
    for layout in LAYOUTS:
        module = toy_experts(**layout)
        storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        view = experts_view(module)
        tensors = [view.w_in, view.w_gate, view.w_out, view.b_in, view.b_gate, view.b_out]
        present = [t for t in tensors if t is not None]
        assert len(present) == 2 + layout["gate"] + layout["bias"] * (2 + layout["gate"])
        assert all(t.untyped_storage().data_ptr() in storages for t in present), _layout_id(layout)
        assert view.w_in.shape == (E, H, D) and view.w_out.shape == (E, D, H)


def test_leading_dims_and_empty_batches() -> None:
    module = toy_experts(gate=True, concatenated=True, transposed=False, bias=True)
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    index, weights = routing(6, E, 2, seed=7)
    y = experts_forward(module, x, index.view(2, 3, 2), weights.view(2, 3, 2), kernel="torch")
    module.config._experts_implementation = "eager"
    check_close(y, module(x.view(6, D), index, weights).view(2, 3, D), "leading dims")
    empty = experts_forward(module, x[:0, 0], index[:0], weights[:0], kernel="torch")
    assert empty.shape == (0, D)
    with pytest.raises(mc.ShapeError, match="ToyExperts"):
        experts_forward(module, x[0], index, weights[:, :1], kernel="torch")


@pytest.mark.parametrize("kernel", KERNELS)
def test_autocast_computes_in_the_autocast_dtype(kernel: str) -> None:
    module = toy_experts(gate=True, concatenated=True, transposed=True, bias=True)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    index, weights = routing(6, E, 2, seed=9)
    outputs = {}
    for implementation in ("eager", impl(kernel)):
        module.config._experts_implementation = implementation
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            outputs[implementation] = module(x, index, weights)
    assert outputs[impl(kernel)].dtype == x.dtype
    torch.testing.assert_close(outputs[impl(kernel)], outputs["eager"], rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------------------------- refusals


def test_refusals_name_the_class_and_the_flag() -> None:
    module = toy_experts(gate=True, concatenated=True, transposed=False, bias=False)
    x = torch.randn(3, D).to(DEVICE)
    index, weights = routing(3, E, 2, seed=8)
    module.config._experts_implementation = "mixcompile"

    module._is_expert_parallel = True
    with pytest.raises(
        mc.ConfigError, match=r"ToyExperts: expert parallelism \(`_is_expert_parallel=True`\)"
    ):
        module(x, index, weights)
    module._is_expert_parallel = False

    module.has_post_expert_norm = True
    with pytest.raises(mc.ConfigError, match=r"ToyExperts: `has_post_expert_norm=True`"):
        module(x, index, weights)
    module.has_post_expert_norm = False

    module.act_fn = nn.Softplus()
    with pytest.raises(mc.ConfigError, match=r"ToyExperts: its activation `act_fn` \(Softplus\)"):
        module(x, index, weights)

    quantized = toy_experts(gate=True, concatenated=True, transposed=False, bias=False)
    quantized.down_proj = nn.Parameter(quantized.down_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(mc.ConfigError, match=r"ToyExperts: `down_proj` is a Parameter of torch.int8"):
        experts_layout(quantized)

    ragged = toy_experts(gate=True, concatenated=True, transposed=False, bias=False)
    ragged.down_proj = nn.Parameter(torch.zeros(E, D, H + 1))
    with pytest.raises(mc.ConfigError, match=r"ToyExperts: `down_proj` has shape \(4, 16, 13\)"):
        experts_layout(ragged)

    with pytest.raises(mc.ConfigError, match="Linear is not a transformers experts module"):
        experts_layout(nn.Linear(2, 2))


def test_custom_gate_is_refused_by_name() -> None:
    """gpt-oss computes a clamped, scaled SwiGLU in its own ``_apply_gate``: refused, naming it."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    module = GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=12, num_local_experts=4))
    with pytest.raises(
        mc.ConfigError, match=r"GptOssExperts: its own `_apply_gate` \(it uses `alpha`, `limit`\)"
    ):
        experts_layout(module)


# ------------------------------------------------------------------------------------------ registration


def tiny_mixtral(**options: Any):
    from transformers import MixtralConfig, MixtralForCausalLM

    sizes = dict(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    config = MixtralConfig(**{**sizes, **options})
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval().to(DEVICE)


def test_every_way_transformers_offers_selects_mixcompile(tmp_path: Path) -> None:
    """from_pretrained(experts_implementation=...), set_experts_implementation, and the config."""
    from transformers import AutoModelForCausalLM

    calls: list[str] = []
    original = experts_forward.__globals__["experts_forward"]

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(module, *args, **kwargs)

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    model = tiny_mixtral()
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default
    model.save_pretrained(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # kernel="auto" on the CPU: the torch kernel
        mp.setitem(experts_forward.__globals__, "experts_forward", counting)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mixcompile").eval()
        assert loaded.config._experts_implementation == "mixcompile"
        with torch.no_grad():
            out = loaded(ids).logits
        assert calls == ["MixtralExperts"] * 2
        built = tiny_mixtral(experts_implementation="mixcompile")
        assert built.config._experts_implementation == "mixcompile"
        with torch.no_grad():
            built(ids)
        assert len(calls) == 4
        model.set_experts_implementation("mixcompile")
        with torch.no_grad():
            model(ids)
        assert len(calls) == 6
    model.set_experts_implementation("eager")
    with torch.no_grad():
        check_close(out, model(ids).logits, "from_pretrained")


def test_a_pinned_kernel_is_the_one_that_runs() -> None:
    """``register_transformers_experts(name, kernel=...)`` runs that kernel plugin (a spy, here)."""
    seen: list[int] = []

    class Spy(mc.Kernel):
        def supports(self, kind, device, dtype):
            return kind == "moe"

        def moe(self, x, plan, experts):
            seen.append(plan.token_index.numel())
            from mixcompile.runtime.kernels import get_kernel

            return get_kernel("torch").moe(x, plan, experts)

    class SpyPlugin:
        @mc.hookimpl
        def register_kernels(self, register):
            register("hf_spy", Spy)

    plugin = mc.register_plugin(SpyPlugin(), name="hf_spy_plugin")
    try:
        assert register_transformers_experts("mixcompile_spy", kernel="hf_spy") == "mixcompile_spy"
        model = tiny_mixtral(experts_implementation="mixcompile_spy")
        ids = torch.randint(0, 64, (2, 5)).to(DEVICE)
        with torch.no_grad():
            model(ids)
        assert seen == [2 * 5 * 2, 2 * 5 * 2]  # one call per layer, N*k pairs each
    finally:
        mc.unregister_plugin(plugin)


def test_registration_refuses_bad_names_and_kernels() -> None:
    for name in ("eager", "grouped_mm", "batched_mm", ""):
        with pytest.raises(mc.ConfigError, match="transformers' own"):
            register_transformers_experts(name)
    with pytest.raises(mc.UnknownNameError, match="Did you mean 'triton'"):
        register_transformers_experts("mixcompile_x", kernel="tritn")


def test_importing_mixcompile_does_not_import_transformers() -> None:
    code = (
        "import sys, mixcompile, mixcompile.integrations; assert 'transformers' not in sys.modules, 'eager'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------ torch.compile


@needs_triton
def test_compiles_whole_with_triton() -> None:
    """fullgraph=True with the Triton kernel: compiled logits and gradients equal eager's (aot_eager)."""
    torch._dynamo.reset()
    model = tiny_mixtral(experts_implementation="mixcompile_triton")
    fill_(model, seed=12)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    expected = run_model(model, "eager", ids)
    model.set_experts_implementation("mixcompile_triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    logits = compiled(input_ids=ids).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11)).to(logits)
    (logits * probe).sum().backward()
    actual = {"logits": logits.detach()}
    actual.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    compare(actual, expected, "compiled")
    torch._dynamo.reset()


@pytest.mark.parametrize("implementation", ["mixcompile_torch", "mixcompile"])
def test_compiles_whole_with_the_torch_kernel_and_with_auto(implementation: str) -> None:
    """The torch kernel's grouped products are one custom op, and ``auto`` is chosen when the
    implementation is registered, not in the forward: fullgraph=True traces the model whole, and compiled
    logits and gradients equal eager's (aot_eager)."""
    torch._dynamo.reset()
    model = tiny_mixtral(experts_implementation=implementation)
    fill_(model, seed=12)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    expected = run_model(model, "eager", ids)
    model.set_experts_implementation(implementation)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    logits = compiled(input_ids=ids).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11)).to(logits)
    (logits * probe).sum().backward()
    actual = {"logits": logits.detach()}
    actual.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    compare(actual, expected, "compiled")
    torch._dynamo.reset()


def test_an_activation_found_by_probing_compiles_after_one_eager_forward() -> None:
    """FastGELUActivation is no class mixcompile knows by name: an eager forward probes it, and a compiled
    one reads what the probe found (it said 'run one forward eagerly first', and still refused after it)."""
    torch._dynamo.reset()
    model = tiny_mixtral(hidden_act="gelu_fast", experts_implementation="mixcompile_torch")
    fill_(model, seed=12)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_notes_an_experts_implementation_that_runs_nothing() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    model.config._experts_implementation = "mixcompile"
    assert "experts_implementation='mixcompile' is set, but no module of LlamaForCausalLM" in str(
        mc.inspect(model)
    )
    assert "runs nothing here" not in str(mc.inspect(tiny_mixtral(experts_implementation="mixcompile")))


def test_inspect_names_the_experts_modules_and_their_implementation() -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    model = tiny_mixtral(experts_implementation="mixcompile_torch")
    report = mc.inspect(model)
    rows = report.to_dict()["hf_experts"]
    assert [r["path"] for r in rows] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert {
        (r["module_class"], r["implementation"], r["mixcompile_supported"], r["kernel"]) for r in rows
    } == {("MixtralExperts", "mixcompile_torch", True, "torch")}
    assert (
        "model.layers.*.mlp.experts MixtralExperts x2, 4 experts, implementation 'mixcompile_torch'"
        in str(report)
    )
    # listed once, as experts: not traced into (a traced experts call read its weights as proxies and
    # reported the module as lacking them)
    assert not any("experts" in path for path in report.to_dict()["untraced"])
    oss = GptOssForCausalLM(
        GptOssConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=12,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
    )
    (row,) = mc.inspect(oss).to_dict()["hf_experts"]
    assert row["implementation"] == "grouped_mm" and not row["mixcompile_supported"]
    assert "own `_apply_gate`" in row["reason"] and row["kernel"] is None
    assert "mixcompile not supported: its own `_apply_gate`" in str(mc.inspect(oss))


def test_cli_inspect_reports_a_saved_hf_moe_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mixcompile.cli.main import main

    tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    assert main(["inspect", str(tmp_path / "mixtral"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["hf_experts"]
    assert len(rows) == 2 and all(
        r["implementation"] == "grouped_mm" and r["mixcompile_supported"] for r in rows
    )
    assert main(["inspect", str(tmp_path / "mixtral")]) == 0
    out = capsys.readouterr().out
    assert "MixtralExperts x2, 4 experts, implementation 'grouped_mm'; mixcompile supported" in out
    # what a conversion would rewrite (not the experts), and how to run the experts on mixcompile instead
    assert "a conversion rewrites the dense FFN sites listed above" in out
    assert 'experts_implementation="mixcompile"' in out


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    """``bench_hf_experts.py --smoke``: every row at tiny sizes on the CPU (Triton in its interpreter), its
    correctness checks against grouped_mm passing, the profiles, and the JSON it writes."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    out = tmp_path / "smoke.json"
    script = ROOT / "benchmarks" / "bench_hf_experts.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["smoke"] and not result["timings_meaningful"]
    implementations = {"mixcompile", "mixcompile (pre-split)", "grouped_mm", "batched_mm"}
    sizes = {(r["shape"], r["tokens"]) for r in result["rows"]}
    assert sizes == {(s, t) for s in ("Mixtral-tiny", "Qwen3-tiny") for t in (16, 1)}
    for size in sizes:
        rows = [r for r in result["rows"] if (r["shape"], r["tokens"]) == size]
        assert {r["implementation"] for r in rows} == implementations
        assert all(r["error"] is None and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows), rows
    for checked in result["checks"]:
        errors = checked["max_rel_error_vs_grouped_mm"]
        assert set(errors) == {"mixcompile", "batched_mm"} and max(errors.values()) < TOL, checked
    assert "x = grouped_mm time / this time" in done.stdout
    profiled = {"mixcompile", "mixcompile (pre-split)", "grouped_mm"}  # forward+backward, kernel by kernel
    assert set(result["profiles"]) == {
        f"{shape}, {tokens} tokens, fwd+bwd, {name}" for shape, tokens in sizes for name in profiled
    }
    assert all(p and all(k["us"] > 0 for k in p) for p in result["profiles"].values()), result["profiles"]


def test_benchmark_only_runs_the_shapes_and_sizes_named(tmp_path: Path) -> None:
    """``--only SHAPE[:TOKENS]`` runs that shape at those token counts (all of them without); an unknown
    shape or a malformed count is a usage error naming it."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "only.json"
    script = ROOT / "benchmarks" / "bench_hf_experts.py"
    command = [sys.executable, str(script), "--smoke", "--out", str(out), "--only", "Qwen3-tiny:1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(r["shape"], r["tokens"]) for r in result["rows"]} == {("Qwen3-tiny", 1)}
    assert result["complete"] and all(r["error"] is None for r in result["rows"]), result["rows"]
    for bad, message in (("Nope", "unknown shape 'Nope'; the shapes are"), ("Qwen3-tiny:x", "integers")):
        done = subprocess.run(
            [sys.executable, str(script), "--smoke", "--only", bad], capture_output=True, text=True, env=env
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_benchmark_times_decode_sizes_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """At decode sizes on a GPU the implementations are timed in turn, round after round, and each row is the
    median of its rounds (the host's time drifts over a run; timed one after the other, a drift favoured
    whichever came first); a failing implementation is a row with its error, not timed again; a skipped one
    is never run. Training-sized rows are timed once. (Measurements stubbed: no GPU needed.)"""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_hf_experts")
    calls: list[tuple[str, bool]] = []
    clock = iter(range(1, 1000))

    class FakeRunner:
        module = nn.Linear(2, 2)

        def forward(self, name: str, grad: bool) -> None:
            calls.append((name, grad))
            if name == "batched_mm":
                raise RuntimeError("out of memory")

    def measure(fn: Any, device: torch.device, rep: int = 50) -> tuple[float, float]:
        fn()
        return float(next(clock)), 0.5

    monkeypatch.setattr(bench, "measure", measure)
    shape = bench.FULL_SHAPES[1]
    skips = {"mixcompile (pre-split)": "skipped: not this time"}
    rows = bench.timed_rows(FakeRunner(), shape, 8, skips, torch.device("cuda"))
    timed = ["mixcompile", "grouped_mm"]
    one_round = [("mixcompile", False), ("mixcompile", True), ("grouped_mm", False), ("grouped_mm", True)]
    assert calls == one_round + [("batched_mm", False)] + one_round * (bench.DECODE_ROUNDS - 1)
    by_name = {r.implementation: r for r in rows}
    assert [r.implementation for r in rows] == list(bench.IMPLEMENTATIONS)
    failed = by_name["batched_mm"]
    assert failed.error == "RuntimeError: out of memory" and failed.fwd_ms is None
    assert by_name["mixcompile (pre-split)"].error == skips["mixcompile (pre-split)"]
    # the clock ticks once per measurement: round i gives mixcompile 4i+1 / 4i+2 and grouped_mm 4i+3 / 4i+4
    middle = (bench.DECODE_ROUNDS - 1) // 2 * 4
    assert [(by_name[n].fwd_ms, by_name[n].fwd_bwd_ms) for n in timed] == [
        (middle + 1, middle + 2),
        (middle + 3, middle + 4),
    ]
    calls.clear()
    rows = bench.timed_rows(FakeRunner(), shape, 16384, skips, torch.device("cuda"))
    assert calls == [("mixcompile", False), ("mixcompile", True), ("grouped_mm", False), ("grouped_mm", True),
                     ("batched_mm", False)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ table


def family_table() -> list[tuple[str, str, str]]:
    """(family, experts classes, status) for every MoE family transformers ships."""
    rows = []
    for name in FAMILIES:
        classes = ", ".join(c.__name__ for c in family(name).experts)
        status, reason = EXPECTED.get(name, ("ok", ""))
        fam = family(name)
        built = [c for c in fam.experts if not isinstance(fam.config[c], str)]
        if status == "refused":
            status = f"refused by mixcompile: {reason}"
        elif name not in UNBUILDABLE:
            status = "checked: whole tiny model (logits, all grads, generate) and experts module vs eager"
        elif built:
            status = f"experts module checked vs eager; whole model not built: {fam.model_error}"
        else:
            status = f"not checked: the experts class does not build from a tiny config: {fam.model_error}"
        rows.append((name, classes, status[:220]))
    rows += [(name, "-", f"not on the experts interface: {why}") for name, why in NOT_ON_INTERFACE.items()]
    return rows


if __name__ == "__main__":
    for row in family_table():
        print(" | ".join(row))
