"""MoT knows the token layout at conversion time: flattened ``[B*T, d]`` FFNs (OPT) get their batch from
the model's forward, sequence-first layers are detected, the recipe can state a layout and is checked
against what the model shows, and Hugging Face models are verified with a real forward of inputs built
from their config without the user passing any."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, build

import mixcompile as mc
from mixcompile.runtime.blocks import MoTBlock

MOT = {"strategy": "mot", "num_experts": 4, "group_size": 2, "sizing": "flop", "init": "random"}
D = 16


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, MoTBlock)]


def test_flattened_opt_ffns_take_their_batch_from_the_forward():
    model = build("opt")
    converted, report = mc.convert_with_report(model, **MOT)
    assert [b.layout for b in _blocks(converted)] == ["flat", "flat"]
    assert [s.layout for s in report.sites] == ["flat", "flat"]
    assert all(s.probe == "inputs built from the model" for s in report.sites)
    converted.train()
    inputs = ZOO["opt"].inputs(4, 6)
    converted(**inputs).logits.square().mean().backward()
    assert all(b.experts.w_in.grad.abs().sum() > 0 for b in _blocks(converted))
    # the groups are formed across sequences: sequence 0's tokens change sequence 1's outputs
    converted.eval()
    with torch.no_grad():
        base = converted(**inputs).logits
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % 100
        assert not torch.allclose(converted(**changed).logits[1], base[1])


class FlatLayer(nn.Module):
    """An FFN applied to flattened tokens, in a model whose forward says nothing of its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, 32), nn.Linear(32, D)

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1))
        return x + self.down(F.gelu(self.up(flat))).view(x.shape)


def test_flattened_tokens_without_a_batch_source_are_refused_naming_the_site():
    model = nn.Sequential(FlatLayer(), FlatLayer())
    with pytest.raises(mc.ConfigError, match=r"FFN site 0 at '0'.*flattened \[B\*T, d\].*token_mask"):
        mc.convert(model, **MOT)
    # stated by the recipe, with the batch given by token_mask around the forward, it runs
    converted = mc.convert(model, **MOT, layout="flat")
    x = torch.randn(4, 3, D)
    with mc.token_mask(converted, None, batch=4):
        assert converted(x).shape == x.shape
    with pytest.raises(mc.ShapeError, match=r"at 0 sees 12 flattened tokens.*token_mask"):
        converted(x)


class SeqFirst(nn.Module):
    """A layer on [T, B, d] inputs (XLNet's convention) that does not say so."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 32), nn.Linear(32, D)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_sequence_first_is_seen_in_a_forward_or_stated_in_the_recipe():
    model = nn.Sequential(SeqFirst(), SeqFirst())
    x = torch.randn(5, 3, D)  # [T=5, B=3, d]
    stated = mc.convert(model, **MOT, layout="seq_first")
    assert [b.layout for b in _blocks(stated)] == ["seq_first", "seq_first"]
    assert stated(x).shape == x.shape
    guess = r"FFN site 0 at '0'.*nothing says which axis.*taken as batch-first"
    with pytest.warns(UserWarning, match=guess) as w:
        guessed = mc.convert(model, **MOT)  # nothing says so: a guess, said out loud
    assert {said.filename for said in w} == {__file__}  # the caller's line
    assert [b.layout for b in _blocks(guessed)] == ["batch_first"] * 2


class AttentionSeqFirst(nn.Module):
    """A causal layer whose nn.MultiheadAttention says [T, B, d]; the FFN beside it says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2)  # batch_first=False
        self.mlp = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))

    def forward(self, x):
        causal = torch.triu(torch.full((x.shape[0], x.shape[0]), float("-inf")), 1)
        x = x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(x)


def test_the_attention_beside_an_ffn_is_a_hint_not_a_witness():
    """nn.MultiheadAttention is sequence-first by default and batch-first models transpose around it, so its
    flag only words the warning; the stated layout decides (and here keeps the model causal)."""
    torch.manual_seed(0)
    model = nn.Sequential(AttentionSeqFirst(), AttentionSeqFirst())
    with pytest.warns(UserWarning, match=r"nn.MultiheadAttention in its layer is sequence-first"):
        assert [b.layout for b in _blocks(mc.convert(model, **MOT))] == ["batch_first"] * 2
    converted = mc.convert(model, **MOT, layout="seq_first").eval()
    x = torch.randn(8, 4, D)  # [T, B, d]
    later = x.clone()
    later[6:] += torch.randn(2, 4, D)
    with torch.no_grad():  # causal: a later position changes no earlier one (batch-first groups would)
        torch.testing.assert_close(converted(later)[:6], converted(x)[:6], rtol=0, atol=0)
    transposing = nn.Sequential(Transposing(), Transposing())  # batch-first around a default attention
    assert [b.layout for b in _blocks(mc.convert(transposing, **MOT, layout="batch_first"))] == [
        "batch_first"
    ] * 2


class Transposing(nn.Module):
    """A batch-first layer around a sequence-first nn.MultiheadAttention: its FFN sees [B, T, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2)
        self.mlp = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D))

    def forward(self, x):
        h = x.transpose(0, 1)
        x = x + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        return x + self.mlp(x)


def test_a_stated_layout_the_model_contradicts_is_an_error():
    with pytest.raises(
        mc.ConfigError, match=r"FFN site 0 at 'layers\.0\._ff_block'.*layout='batch_first'.*'seq_first'"
    ):
        mc.convert(build("encoder_seq_first"), **MOT, layout="batch_first")
    with pytest.raises(
        mc.ConfigError, match=r"layout='seq_first'.*forward of the model's inputs shows 'flat'"
    ):
        mc.convert(build("opt"), **MOT, layout="seq_first")


def test_inspect_decides_the_layout_as_convert_does():
    """inspect said 'planned, layout batch_first' for a stated layout convert refuses, and reported
    batch_first for every MoT site whatever the model's layout (it ran no forward)."""
    with pytest.raises(mc.ConfigError, match=r"layout='batch_first'.*'seq_first'"):
        mc.inspect(build("encoder_seq_first"), **MOT, layout="batch_first")
    with pytest.raises(
        mc.ConfigError, match=r"layout='seq_first'.*forward of the model's inputs shows 'flat'"
    ):
        mc.inspect(build("opt"), **MOT, layout="seq_first")
    for name in ("encoder_seq_first", "opt"):
        planned = [site.layout for site in mc.inspect(build(name), **MOT).sites if site.status == "planned"]
        converted = [r.layout for r in mc.compiler.recipes_of(mc.convert(build(name), **MOT))]
        assert planned and set(planned) == set(converted) != {"batch_first"}


def test_layout_is_recipe_data():
    recipe = mc.Recipe(strategy="mot", layout="seq_first")
    assert recipe.to_dict()["layout"] == "seq_first"
    assert mc.Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(mc.UnknownNameError, match="unknown layout 'seq_frist'. Did you mean 'seq_first'"):
        mc.Recipe(layout="seq_frist")


def test_the_found_layout_is_recorded_for_replay(tmp_path):
    converted = mc.convert(build("opt"), **MOT)
    assert [r.layout for r in mc.compiler.recipes_of(converted)] == ["flat"]
    mc.save(converted, tmp_path / "opt-mot")
    loaded = mc.load(tmp_path / "opt-mot")
    inputs = ZOO["opt"].inputs(2, 5)
    converted.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, converted(**inputs).logits, rtol=0, atol=0)


def test_hugging_face_models_are_verified_with_their_own_inputs():
    _, report = mc.convert_with_report(build("llama"), strategy="moe", num_experts=4, top_k=2)
    assert report.model_max_error is not None and report.model_max_error < 1e-5
    assert all(s.probe == "inputs built from the model" for s in report.sites)
    _, plain = mc.convert_with_report(nn.Sequential(SeqFirst()), strategy="moe", num_experts=4, top_k=2)
    assert plain.model_max_error is None and plain.sites[0].probe == "random"
