"""The compiler across the model zoo: every FFN found, upcycled MoE equal to dense, MoT trains, HF causal
LMs still generate, state_dicts round-trip, and the input model is never touched."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, build

from mixcompile.compiler import convert, find_sites
from mixcompile.runtime.blocks import MoEBlock, MoTBlock

pytestmark = pytest.mark.filterwarnings("ignore:.*nested tensors:UserWarning")

NAMES = list(ZOO)
CAUSAL = [name for name, entry in ZOO.items() if entry.causal_lm]
MOE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "upcycle"}
MOT = {"strategy": "mot", "num_experts": 4, "group_size": 2, "sizing": "flop", "init": "random"}


def _main_output(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output["logits"] if "logits" in output else output["last_hidden_state"]


def _forward(model: torch.nn.Module, name: str, *, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return _main_output(model(**ZOO[name].inputs(4, 6)))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoEBlock | MoTBlock)]


@pytest.mark.parametrize("name", NAMES)
def test_finds_every_ffn(name: str) -> None:
    sites = find_sites(build(name)).sites
    assert len(sites) == ZOO[name].num_ffns
    assert all(site.rewrite is not None for site in sites), [site.reason for site in sites]


@pytest.mark.parametrize("name", NAMES)
def test_upcycled_moe_equals_dense(name: str) -> None:
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(path, type(m)) for path, m in model.named_modules()]
    converted = convert(model, **MOE)

    assert type(converted) is type(model)
    assert len(_blocks(converted)) == ZOO[name].num_ffns
    for train in (False, True):
        assert _rel_err(_forward(model, name, train=train), _forward(converted, name, train=train)) < 1e-5
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [(path, type(m)) for path, m in model.named_modules()] == structure


@pytest.mark.parametrize("name", NAMES)
def test_mot_runs_forward_and_backward(name: str) -> None:
    converted = convert(build(name), **MOT)
    converted.train()
    _main_output(converted(**ZOO[name].inputs(4, 6))).float().square().mean().backward()
    blocks = _blocks(converted)
    assert len(blocks) == ZOO[name].num_ffns and all(isinstance(b, MoTBlock) for b in blocks)
    assert all(b.experts.w_in.grad is not None and b.experts.w_in.grad.abs().sum() > 0 for b in blocks)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name: str) -> None:
    recipe = {**MOE, "init_options": {"noise": 0.1}, "seed": 1}
    source = convert(build(name), **recipe)
    fresh = convert(build(name, seed=7), **{**recipe, "seed": 2})
    fresh.load_state_dict(source.state_dict())
    assert torch.equal(_forward(source, name, train=False), _forward(fresh, name, train=False))


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_still_generates(name: str) -> None:
    model = build(name).eval()
    prompt = ZOO[name].inputs(1, 4)["input_ids"]
    converted = convert(model, **MOE).eval()
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=3, do_sample=False)
        got = converted.generate(prompt, max_new_tokens=3, do_sample=False)
    assert got.shape == (1, 7)
    assert torch.equal(got, expected)


def test_mot_causal_lm_generates() -> None:
    converted = convert(build("llama"), **MOT).eval()
    prompt = ZOO["llama"].inputs(1, 4)["input_ids"]
    with torch.no_grad():
        assert converted.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_sequence_first_encoder_gets_sequence_first_mot() -> None:
    converted = convert(build("encoder_seq_first"), **MOT)
    assert [b.layout for b in _blocks(converted)] == ["seq_first", "seq_first"]


def test_transformer_encoder_fast_path_stays_correct() -> None:
    """Eval with a padding mask takes the nested-tensor fast path; the converted encoder must not."""
    model = build("transformer_encoder").eval()
    converted = convert(model, **MOE).eval()
    x = ZOO["transformer_encoder"].inputs(3, 5)["src"]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with torch.no_grad():
        expected, got = model(x, src_key_padding_mask=mask), converted(x, src_key_padding_mask=mask)
    # the fast path zero-fills padded positions, the regular path computes them: compare real tokens
    assert _rel_err(expected[~mask], got[~mask]) < 1e-5
