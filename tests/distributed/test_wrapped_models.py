"""Saving and parallelizing models under data parallelism (DDP, nn.DataParallel, FSDP2), in one gloo process
(world size 1): what these check happens on every rank alike, before any collective."""

from __future__ import annotations

import gc
import inspect
import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import distributed_workers as dw
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mixcompile as mc
from mixcompile import distributed as mcd

TINY = {"vocab_size": 64, "d_model": 16, "n_layer": 1, "n_head": 2, "d_ff": 32, "max_seq": 8}

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of this process alone, for the module's tests."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("one_rank") / "store"
    with pytest.MonkeyPatch.context() as patch:
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            patch.setenv("GLOO_SOCKET_IFNAME", dw._loopback())
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=timedelta(seconds=60)
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def converted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    router_options = {"bias_balancing": True}
    return mc.convert(
        mc.build_tiny_gpt(**TINY), strategy="moe", num_experts=4, top_k=2, router_options=router_options
    )


def saved_files(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(path / "model.safetensors"), json.loads((path / "mixcompile.json").read_text())


def fully_shard_or_skip() -> Callable[..., nn.Module]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        pytest.skip(f"fully_shard of torch {torch.__version__} has no ignored_params")
    return fully_shard


def shard(model: nn.Module) -> nn.Module:
    """The README's FSDP2 setup."""
    fully_shard_or_skip()(model, ignored_params=set(mcd.rank_local_state(model).values()))
    return model


# ---- a data-parallel wrapper saves as the model it wraps -------------------------------------------------

WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "data_parallel": mcd.data_parallel,
    "DistributedDataParallel": DistributedDataParallel,
    "nn.DataParallel": nn.DataParallel,
    "data_parallel(torch.compile)": lambda model: mcd.data_parallel(torch.compile(model)),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_a_data_parallel_wrapper_saves_as_the_model_it_wraps(one_rank, tmp_path, wrap) -> None:
    """mc.save(data_parallel(model)) said the model "was not converted by mixcompile (no recipe
    recorded)": the recipes are on the model inside the wrapper's .module."""
    model = converted()
    wrapper = WRAPPERS[wrap](model)
    assert list(mc.sparse_blocks(wrapper)) == list(mc.sparse_blocks(model)) == ["blocks.0.mlp"]
    mc.save(wrapper, tmp_path / "wrapped")
    mc.save(model, tmp_path / "bare")
    (tensors, manifest), (expected, expected_manifest) = (
        saved_files(tmp_path / "wrapped"),
        saved_files(tmp_path / "bare"),
    )
    assert manifest == expected_manifest
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = mc.load(tmp_path / "wrapped").eval()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model.eval()(tokens))


def test_a_wrapped_parallelized_model_is_refused_for_its_sharded_experts(one_rank, tmp_path) -> None:
    """Through the wrapper, save reaches the expert-parallel check, not "not converted"."""
    model = mcd.parallelize(converted())
    with pytest.raises(mc.ConfigError, match=r"'blocks.0.mlp' holds only this rank's experts"):
        mc.save(mcd.data_parallel(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- an FSDP2-sharded model is refused, saying how to save it ---------------------------------------------


def test_save_refuses_an_fsdp2_sharded_model_and_its_advice_works(one_rank, tmp_path) -> None:
    """mc.save of a fully_shard-ed model failed inside safetensors ("Attempted to access the data pointer
    on an invalid python storage"); it now says what is sharded and how to save, and that way works."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reference = converted()
    sharded = shard(converted())
    with pytest.raises(mc.ConfigError) as error:
        mc.save(sharded, tmp_path / "out")
    message = str(error.value)
    assert "sharded DTensors ('wte.weight' first" in message and "Save before fully_shard" in message
    assert "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True" in message
    assert not (tmp_path / "out").exists()

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    unsharded = converted(seed=1)
    unsharded.load_state_dict(get_model_state_dict(sharded, options=options))
    mc.save(unsharded, tmp_path / "out")
    loaded = mc.load(tmp_path / "out").state_dict()
    expected = reference.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_save_pretrained_refuses_an_fsdp2_sharded_model(one_rank, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    model = mc.convert(transformers.LlamaForCausalLM(config), strategy="moe", num_experts=4, top_k=2)
    shard(model)
    with pytest.raises(mc.ConfigError, match=r"sharded DTensors \('model\.embed_tokens\.weight' first"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---- parallelize refuses a model already under data parallelism ------------------------------------------


def keep(wrapper: nn.Module, model: nn.Module, kept: list[nn.Module]) -> nn.Module:
    """``model``, with its wrapper kept alive in ``kept`` (a dropped wrapper blocks nothing)."""
    kept.append(wrapper)
    return model


ALREADY_PARALLEL: dict[str, Callable[[nn.Module, list[nn.Module]], nn.Module]] = {
    # what parallelize is given, after wrapping: the model, or what holds it
    "data_parallel(model)": lambda model, kept: keep(mcd.data_parallel(model), model, kept),
    "data_parallel(nn.Sequential(model))": lambda model, kept: keep(
        mcd.data_parallel(nn.Sequential(model)), model, kept
    ),
    "data_parallel(torch.compile(model))": lambda model, kept: keep(
        mcd.data_parallel(torch.compile(model)), model, kept
    ),
    "the DDP wrapper": lambda model, kept: mcd.data_parallel(model),
    "nn.Sequential(DDP(model))": lambda model, kept: nn.Sequential(DistributedDataParallel(model)),
    "nn.DataParallel(model)": lambda model, kept: nn.DataParallel(model),
}


@pytest.mark.parametrize("case", list(ALREADY_PARALLEL))
def test_parallelize_refuses_a_model_already_under_data_parallelism(one_rank, case) -> None:
    """data_parallel before parallelize failed only at the second training step, with DDP's misleading
    "Expected to have finished reduction in the prior iteration ... find_unused_parameters=True"."""
    model = converted()
    kept: list[nn.Module] = []
    target = ALREADY_PARALLEL[case](model, kept)
    with pytest.raises(mc.ConfigError, match=r"Call parallelize first.*build the optimizer after"):
        mcd.parallelize(target)
    block = model.blocks[0].mlp
    assert block.expert_parallel is None and block.experts.num_experts == 4  # left as it was


def test_parallelize_refuses_an_fsdp2_sharded_model(one_rank) -> None:
    model = shard(converted())
    with pytest.raises(mc.ConfigError, match=r"sharded by FSDP2's fully_shard.*Call parallelize first"):
        mcd.parallelize(model)


def test_a_data_parallel_wrapper_no_longer_alive_does_not_block_parallelize(one_rank) -> None:
    model = converted()
    wrapper = mcd.data_parallel(model)
    del wrapper
    gc.collect()
    mcd.parallelize(model)
    assert model.blocks[0].mlp.expert_parallel is not None
