"""MoT respects padding: a position the attention mask marks as padding takes no part in its group (it
neither sends nor receives a mixture), with the mask taken from the model's own ``attention_mask`` by the
hooks ``convert`` installs, and from :func:`mixcompile.token_mask` for hand-written models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import VOCAB, build

import mixcompile as mc
from mixcompile.runtime.blocks import MoTBlock

MOT = {
    "strategy": "mot",
    "num_experts": 4,
    "group_size": 4,
    "init": "random",
    "mixer_options": {"init_std": 1.0},
}


def _padded(pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 8), generator=generator)
    mask = torch.ones(4, 8, dtype=torch.long)
    if pad == "right":
        mask[0, -3:], mask[2, -1:] = 0, 0
    else:
        mask[1, :3], mask[3, :2] = 0, 0
    return ids, mask


def _main(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_padded_tokens_change_nothing_else(name, pad):
    torch.manual_seed(0)
    model = mc.convert(build(name), **MOT).eval()
    ids, mask = _padded(pad)
    other = torch.where(mask.bool(), ids, torch.randint(3, VOCAB, ids.shape))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        before, after = (
            _main(model(input_ids=ids, attention_mask=mask)),
            _main(model(input_ids=other, attention_mask=mask)),
        )
        keep = mask.bool()
        torch.testing.assert_close(after[keep], before[keep], rtol=1e-5, atol=1e-5)
        # and the groups do mix: a real token of sequence 0 changes the other sequences' outputs
        changed = ids.clone()
        changed[0, 1] = (ids[0, 1] + 1 - 3) % (VOCAB - 3) + 3
        mixed = _main(model(input_ids=changed, attention_mask=mask))
    assert not torch.allclose(mixed[1:][keep[1:]], before[1:][keep[1:]], rtol=1e-5, atol=1e-5)
    assert all(not block.token_context for block in model.modules() if isinstance(block, MoTBlock))


def test_padding_takes_no_part_in_the_groups_softmax():
    torch.manual_seed(0)
    block = MoTBlock(8, 16, 3, group_size=3, mixer_options={"init_std": 1.0})
    x = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    with mc.token_mask(block, mask):
        y = block(x)
        merge = block.mixer(*_grouped(block, x, mask), sparse=False).merge  # [T, 1, G, E]
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))  # padding receives nothing
    assert torch.equal(merge[~mask.T[:, None, :]], torch.zeros_like(merge[~mask.T[:, None, :]]))
    # real members still sum to one; position 3 has none (no NaN, nothing mixed)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.0])[:, None].expand(4, 3)
    torch.testing.assert_close(merge[:, 0].sum(1), expected)
    assert torch.isfinite(y).all()
    y[mask].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)


def _grouped(block, x, mask):
    x_g = x.reshape(1, 3, 4, 8).permute(2, 0, 1, 3)
    return x_g, mask.T[:, None, :]


def test_hand_written_models_use_the_token_mask_context():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    mot = mc.convert(model, strategy="mot", num_experts=2, group_size=2, init="random")
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad(), mc.token_mask(mot, mask):
        y = mot(x)
        x2 = x.clone()
        x2[0, 3:] = 100.0
        torch.testing.assert_close(mot(x2)[1], y[1], rtol=1e-5, atol=1e-5)
    assert not mot[0].token_context  # popped on exit
    with torch.no_grad():
        assert not torch.allclose(mot(x2)[1], mot(x)[1])  # without the mask, padding is mixed in


def test_transformer_encoder_key_padding_mask_reaches_the_blocks():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    mot = mc.convert(model, strategy="mot", num_experts=2, group_size=2, init="random").eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    x2 = x.clone()
    x2[0, 3:] = 50.0
    with torch.no_grad():
        y, y2 = mot(x, src_key_padding_mask=padding), mot(x2, src_key_padding_mask=padding)
    torch.testing.assert_close(y2[~padding], y[~padding], rtol=1e-5, atol=1e-5)


def test_a_mask_that_does_not_fit_is_an_error_naming_the_block():
    block = MoTBlock(8, 16, 2, group_size=2, site="model.layers.3.mlp")
    with mc.token_mask(block, torch.ones(3, 4)), pytest.raises(mc.ShapeError, match=r"model\.layers\.3\.mlp"):
        block(torch.randn(2, 4, 8))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_padding_masks_reach_the_encoder_and_decoder_blocks(batch_first):
    """``nn.Transformer`` in both layouts: the encoder's blocks see ``src_key_padding_mask``, the
    decoder's ``tgt_key_padding_mask`` (the hooks sit on the two stacks), so changing padded source or
    target positions changes no real target position; real tokens still mix across sequences."""
    torch.manual_seed(0)
    model = build("transformer" if batch_first else "transformer_seq_first")
    mot = mc.convert(model, **{**MOT, "group_size": 2}).eval()
    assert {b.layout for b in mot.modules() if isinstance(b, MoTBlock)} == {
        "batch_first" if batch_first else "seq_first"
    }
    generator = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(4, 6, 32, generator=generator), torch.randn(4, 5, 32, generator=generator)
    src_pad, tgt_pad = torch.zeros(4, 6, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool)
    src_pad[1, -2:], tgt_pad[0, -2:], tgt_pad[2, -1:] = True, True, True
    src2, tgt2 = src.clone(), tgt.clone()
    src2[src_pad], tgt2[tgt_pad] = 50.0, -50.0

    def run(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        masks = {"src_key_padding_mask": src_pad, "tgt_key_padding_mask": tgt_pad}
        with torch.no_grad():
            y = mot(s, t, memory_key_padding_mask=src_pad, **masks)
        return y if batch_first else y.transpose(0, 1)

    before, keep = run(src, tgt), ~tgt_pad
    torch.testing.assert_close(run(src2, tgt)[keep], before[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(src, tgt2)[keep], before[keep], rtol=1e-5, atol=1e-5)
    changed = tgt.clone()
    changed[0, 1] += 1.0  # a real target token of sequence 0: its group partner (sequence 1) changes
    assert not torch.allclose(run(src, changed)[1], before[1], rtol=1e-5, atol=1e-5)
    assert all(not block.token_context for block in mot.modules() if isinstance(block, MoTBlock))
