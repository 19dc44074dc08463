"""Bad inputs and arguments of the blocks and of token_mask get an error naming them, never a result computed
from the wrong thing (a meta skeleton's uninitialised memory) nor an error from deep inside torch."""

import numpy as np
import pytest
import torch
from torch import nn

import mixcompile as mc
from mixcompile.runtime.experts import StackedExperts

BLOCKS = {
    "moe": lambda **kw: mc.MoEBlock(16, 32, 4, top_k=2, **kw),
    "moe_bias": lambda **kw: mc.MoEBlock(16, 32, 4, top_k=2, bias=True, **kw),
    "mot": lambda **kw: mc.MoTBlock(16, 32, 4, group_size=2, **kw),
}


@pytest.mark.parametrize("kind", BLOCKS)
def test_a_block_whose_experts_are_on_meta_refuses_a_real_input(kind):
    """It returned uninitialised memory (MoE), a meta tensor (MoT), or blamed the kernel as a plugin bug."""
    block = BLOCKS[kind](device="meta")
    with pytest.raises(mc.ConfigError, match=r"input on cpu, but experts.w_in, .* are on the meta device"):
        block(torch.randn(2, 5, 16))


@pytest.mark.parametrize("kind", BLOCKS)
def test_a_block_whose_router_or_mixer_alone_is_on_meta_refuses_a_real_input(kind):
    """Experts loaded into a meta skeleton, the router's (or mixer's) weights not: torch multiplied the CPU
    input by the meta weight without a word and the block returned what uninitialised memory routed."""
    real = BLOCKS[kind]()
    block = BLOCKS[kind](device="meta")
    experts = {k: v for k, v in real.state_dict().items() if k.startswith("experts.")}
    missing = block.load_state_dict(experts, strict=False, assign=True).missing_keys
    assert missing == ["mixer.controller.weight" if kind == "mot" else "router.gate.weight"]
    block.choose_kernels()
    with pytest.raises(mc.ConfigError, match=rf"input on cpu, but {missing[0]} is on the meta device"):
        block(torch.randn(2, 5, 16))


def test_a_model_converted_on_meta_with_only_the_dense_weights_loaded_refuses_a_forward():
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(16, 64, bias=False), nn.SiLU(), nn.Linear(64, 16, bias=False))
    converted = mc.convert(skeleton, strategy="moe", num_experts=4, top_k=2)
    converted.load_state_dict({}, strict=False, assign=True)
    with pytest.raises(mc.ConfigError, match=r"MoEBlock at .* meta device \(a skeleton"):
        converted(torch.randn(3, 16))


@pytest.mark.parametrize("kind", BLOCKS)
def test_an_input_on_another_device_than_the_experts_is_refused_naming_both(kind):
    block = BLOCKS[kind]()
    with pytest.raises(
        mc.ShapeError, match=r"input on meta, but experts.w_in, .* are on cpu: move the input"
    ):
        block(torch.randn(2, 5, 16, device="meta"))


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("router", ["topk", "topk capacity", "switch", "hash", "expert_choice"])
def test_a_moe_block_on_meta_infers_shapes_from_a_meta_input(router, debug):
    """As a dense model on meta does; the autocast query raised for the meta device, the checks read
    values a meta tensor does not have, and so did the capacity's drop (torch.nonzero); its statistics are
    None, not torch's "cannot copy out of meta tensor"."""
    top_k = 1 if router == "switch" else 2
    options = {"capacity_factor": 1.0} if router == "topk capacity" else {}
    block = mc.MoEBlock(
        16, 32, 4, top_k=top_k, router=router.split()[0], router_options=options, bias=True,
        num_shared_experts=1, device="meta",
    )  # fmt: skip
    with mc.debug_checks(debug):
        y = block(torch.randn(2, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (2, 5, 16)
    stats = block.last_stats
    assert stats["tokens"] == 10 and stats["expert_load"] is None
    assert mc.stats(nn.Sequential(block))["0"]["routing_entropy"] is None
    # Whether a capacity drops a pick is a value: unknown on meta, not 0. A dropless plan drops none.
    if router in ("topk capacity", "expert_choice"):
        assert stats["dropped_assignments"] is None and stats["dropped_tokens"] is None
    else:
        assert stats["dropped_assignments"] == 0


def test_a_model_converted_on_meta_infers_shapes_from_a_meta_input():
    with torch.device("meta"):
        dense = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    converted = mc.convert(dense, strategy="moe", num_experts=4, top_k=2)
    y = converted(torch.randn(3, 16, device="meta"))
    assert y.is_meta and y.shape == (3, 16)


CONSTRUCTORS = {
    "MoEBlock": lambda **kw: mc.MoEBlock(16, 32, 4, **kw),
    "MoTBlock": lambda **kw: mc.MoTBlock(16, 32, 4, group_size=2, **kw),
    "StackedExperts": lambda **kw: StackedExperts(4, 16, 32, **kw),
}
FLAGS = [(cls, "gated") for cls in CONSTRUCTORS] + [(cls, "bias") for cls in CONSTRUCTORS]


@pytest.mark.parametrize(("cls", "flag"), FLAGS)
@pytest.mark.parametrize("value", ["no", 1, None])
def test_boolean_flags_must_be_bools(cls, flag, value):
    """``gated="no"`` is truthy: it built gated experts with biases."""
    with pytest.raises(mc.ConfigError, match=rf"^{flag} must be True or False, got {value!r}"):
        CONSTRUCTORS[cls](**{flag: value})


@pytest.mark.parametrize("kind", ["moe", "mot"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float16"}, r"dtype must be a floating-point torch.dtype such as .*, got 'float16'"),
        ({"dtype": torch.int64}, r"dtype must be a floating-point torch.dtype such as .*, got torch.int64"),
        ({"device": "cpux"}, r"device must be a torch.device or a device string .*, got 'cpux'"),
    ],
)
def test_dtype_and_device_are_checked_naming_the_argument(kind, kwargs, message):
    with pytest.raises(mc.ConfigError, match=message) as info:
        BLOCKS[kind](**kwargs)
    if "device" in kwargs:
        assert isinstance(info.value.__cause__, RuntimeError)  # torch's own message, kept as the cause


@pytest.mark.parametrize("options", [[("capacity_factor", 1.0), 2], "capacity_factor=1", {1: 2.0}])
@pytest.mark.parametrize(("cls", "name"), [("MoEBlock", "router_options"), ("MoTBlock", "mixer_options")])
def test_plugin_options_must_be_a_dict_of_keyword_options(cls, name, options):
    with pytest.raises(mc.ConfigError, match=rf"^{name} must be a dict of keyword options"):
        CONSTRUCTORS[cls](**{name: options})


@pytest.mark.parametrize("batch", [3.7, True, 0, -1])
def test_token_mask_checks_the_batch_size(batch):
    """It was int()-ed: 3.7 ran as 3, True as 1; 0 and -1 failed later, from the block or torch."""
    block = mc.MoTBlock(16, 32, 4, group_size=2, layout="flat")
    with pytest.raises(mc.ConfigError, match=r"^batch must be"), mc.token_mask(block, None, batch=batch):
        block(torch.randn(15, 16))


@pytest.mark.parametrize("batch", [3, np.int64(3), torch.tensor(3)], ids=["int", "numpy", "tensor"])
def test_token_mask_takes_an_integer_like_batch_size(batch):
    """Integer-like counts worked before the checks above (a numpy integer, a 0-d integer tensor): still."""
    block = mc.MoTBlock(16, 32, 4, group_size=2, layout="flat")
    with mc.token_mask(block, None, batch=batch):
        assert block(torch.randn(15, 16)).shape == (15, 16)


@pytest.mark.parametrize(("cls", "flag"), [("MoEBlock", "gated"), ("MoTBlock", "bias")])
def test_numpy_booleans_are_booleans(cls, flag):
    """A flag read from a numpy array or a sweep's grid is a numpy bool: taken as the bool it is."""
    assert CONSTRUCTORS[cls](**{flag: np.False_}) is not None


def test_token_mask_refuses_a_batch_size_that_contradicts_its_mask():
    block = mc.MoTBlock(16, 32, 4, group_size=2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(mc.ConfigError, match=r"batch=2 contradicts"), mc.token_mask(block, mask, batch=2):
        pass


@pytest.mark.parametrize("model", [None, "model", torch.ones(3, 5)])
def test_token_mask_refuses_what_is_not_a_module(model):
    with (
        pytest.raises(TypeError, match=r"token_mask expects a torch.nn.Module"),
        mc.token_mask(model, None, batch=3),
    ):
        pass


def test_a_mot_block_on_meta_infers_shapes_from_a_meta_input() -> None:
    """As a dense FFN does: a meta forward gives the output's shape (the mixer's float32 scores turn off an
    autocast the meta device does not have)."""
    block = mc.MoTBlock(16, 32, 4, group_size=2, device="meta")
    y = block(torch.randn(3, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (3, 5, 16)
    assert block.last_stats["merge_entropy"] is None and block.last_stats["groups"] == 2  # of 2 sequences
