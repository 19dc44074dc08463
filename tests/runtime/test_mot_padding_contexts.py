"""Which padding mask a MoT block takes when its tokens are not simply the model's input positions: a model
that pools the sequence (Funnel), an encoder-decoder whose decoder takes no ``attention_mask`` (FSMT), a
decoder that joins streams along the sequence axis (ProphetNet), a forward given a key/value cache; and the
mixer's numerics (controller scores in float32 for bf16 blocks, the temperature only on the group softmax).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn
from zoo import build, build_family, hf_families

import mixcompile as mc
from mixcompile.runtime.blocks import MoTBlock
from mixcompile.runtime.tokens import tokens_of_prepared_mask

MOT = {
    "strategy": "mot",
    "num_experts": 4,
    "group_size": 2,
    "init": "random",
    "seed": 0,
    "mixer_options": {"init_std": 1.0},
}


def _family(name: str) -> nn.Module:
    family = {f.name: f for f in hf_families()}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_family(family)


def _record(block: MoTBlock) -> dict:
    """The block's last input and output, and the present mask its mixer got (``[T or 1, n, G]``)."""
    seen: dict = {}
    block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    block.mixer.register_forward_pre_hook(lambda m, a: seen.update(present=a[1]))
    return seen


# ------------------------------------------------------------------ a forward with or without a cache


class _PoolingLM(nn.Module):
    """Takes the model's inputs, then keeps every other position before its FFN (as Funnel pools); with
    ``cache`` given, the mask covers the cached positions and the FFN sees the new ones."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, input_ids, attention_mask=None, cache=None):
        x = self.embed(input_ids)
        if cache is None:
            x = x[:, ::2]
        return self.mlp(x)


def _pooling_mot() -> nn.Module:
    torch.manual_seed(0)
    return mc.convert(_PoolingLM(), **MOT, layout="batch_first").eval()


def test_a_longer_mask_without_a_cache_and_with_padding_is_an_error_naming_the_block():
    mot = _pooling_mot()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, -2:] = 0
    with torch.no_grad(), pytest.raises(mc.ShapeError) as error:
        mot(ids, attention_mask=mask)
    message = str(error.value)
    assert "mlp" in message and "3 tokens" in message and "(2, 6)" in message
    assert "no key/value cache" in message and "mixcompile.token_mask" in message
    assert all(not b.token_context for b in mot.modules() if isinstance(b, MoTBlock))


def test_a_longer_mask_without_a_cache_and_without_padding_leaves_every_token_present():
    mot = _pooling_mot()
    block = next(b for b in mot.modules() if isinstance(b, MoTBlock))
    seen = _record(block)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        y = mot(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
        assert seen["present"].all()
        torch.testing.assert_close(y, mot(ids))


def test_compiled_the_pooled_check_runs_on_device():
    """fullgraph: the padding check of a block that sees fewer tokens than the mask is no graph break."""
    mot = _pooling_mot()
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones_like(ids)
    compiled = torch.compile(mot, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids, attention_mask=mask), mot(input_ids=ids, attention_mask=mask)
        )
        mask[0, 4:] = 0
        with pytest.raises(RuntimeError, match="cannot tell which positions of the mask are its tokens"):
            compiled(input_ids=ids, attention_mask=mask)


def test_with_a_cache_a_longer_mask_gives_its_last_columns():
    mot = _pooling_mot()
    block = next(b for b in mot.modules() if isinstance(b, MoTBlock))
    seen = _record(block)
    ids = torch.randint(0, 50, (2, 2))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # 4 cached positions, then the 2 new
    with torch.no_grad():
        mot(ids, attention_mask=mask, cache=object())
    assert seen["present"][:, 0, :].T.tolist() == [[True, False], [True, True]]


def test_token_mask_keeps_taking_a_longer_masks_last_columns():
    torch.manual_seed(0)
    block = MoTBlock(8, 16, 2, group_size=2, mixer_options={"init_std": 1.0})
    seen = _record(block)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad(), mc.token_mask(block, mask):
        block(torch.randn(2, 2, 8))
    assert seen["present"][:, 0, :].T.tolist() == [[True, False], [True, True]]


def test_cached_generation_steps_take_the_masks_last_columns():
    """Llama with a left-padded prompt: the last position's logits of a cached step (mask longer than the
    step's token, the forward given the cache) equal a full forward's."""
    torch.manual_seed(0)
    mot = mc.convert(build("llama"), **MOT).eval()
    ids = torch.randint(3, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, :3], mask[2, :1] = 0, 0
    with torch.no_grad():
        full = mot(input_ids=ids, attention_mask=mask).logits[:, -1]
        prefix = mot(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = getattr(prefix, "cache", None) or prefix.past_key_values
        name = "cache" if "cache" in inspect.signature(type(mot).forward).parameters else "past_key_values"
        step = mot(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def _prepared(padding: torch.Tensor, queries: int, causal: bool, additive: bool = False) -> torch.Tensor:
    """A transformers-style prepared mask ``[B, 1, queries, keys]`` (the queries are the last positions)
    from a 2-D padding mask ``[B, keys]``, by an independent rule: a key is visible if real (and, causal,
    not after the query)."""
    keys = padding.shape[1]
    query_at = torch.arange(keys - queries, keys)[:, None]
    visible = padding.bool()[:, None, :] & ((torch.arange(keys)[None, :] <= query_at) | (not causal))
    if additive:
        return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]
    return visible[:, None]


@pytest.mark.parametrize(
    ("queries", "causal", "additive"), [(9, True, False), (9, False, True), (3, True, True), (1, True, False)]
)
def test_a_prepared_4d_mask_tells_which_query_tokens_are_padding(queries, causal, additive):
    """What a static cache's generate (or a model given a 4-D mask) passes instead of the 2-D mask."""
    generator = torch.Generator().manual_seed(queries)
    padding = torch.ones(4, 9, dtype=torch.long)
    padding[0, :3] = 0  # left padding
    padding[2, 6:] = 0  # right padding (a prompt, no cache)
    padding[3] = (torch.rand(9, generator=generator) > 0.3).long()
    padding[3, -1] = 1
    if queries < 9:  # generation: the new tokens are real
        padding[:, -queries:] = 1
    got = tokens_of_prepared_mask(_prepared(padding, queries, causal, additive))
    torch.testing.assert_close(got, padding[:, -queries:].bool())
    as_integers = tokens_of_prepared_mask(_prepared(padding, queries, causal).long())  # a user's 1 / 0 mask
    torch.testing.assert_close(as_integers, padding[:, -queries:].bool())


def test_a_static_prefill_whose_prompts_all_end_in_padding_is_placed_by_its_real_tokens():
    """Prompts right-padded to one length (padding="max_length") in a static cache of 12 slots: the last
    query is padding in every sequence, so it cannot place the queries; a real one can."""
    real = torch.tensor([[1] * 5 + [0] * 3, [1] * 6 + [0] * 2])
    keys = torch.cat([real, torch.zeros(2, 4, dtype=torch.long)], dim=1)  # slots 8..11 not written yet
    visible = keys.bool()[:, None, :] & (torch.arange(12)[None, :] <= torch.arange(8)[:, None])
    torch.testing.assert_close(tokens_of_prepared_mask(visible[:, None]), real.bool())


def test_a_prepared_mask_broadcast_over_the_batch_is_every_sequences():
    """A [1, 1, T, T] mask on a batch of 2, which the dense model accepts."""
    torch.manual_seed(0)
    mot = mc.convert(build("llama"), **MOT).eval()
    ids = torch.randint(3, 100, (2, 6))
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    with torch.no_grad():
        torch.testing.assert_close(
            mot(input_ids=ids, attention_mask=causal).logits, mot(input_ids=ids).logits
        )


def test_static_cache_generation_keeps_padding_out_of_the_groups():
    """generate(cache_implementation="static") passes 4-D masks: they were read as "no padding", so one
    sequence's left padding joined the group of the unpadded sequence beside it."""
    torch.manual_seed(0)
    mot = mc.convert(build("llama"), **MOT).eval()
    block = next(iter(mc.sparse_blocks(mot).values()))
    presents: list[torch.Tensor] = []
    block.mixer.register_forward_pre_hook(lambda m, a: presents.append(a[1]))
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    with torch.no_grad():
        static = mot.generate(ids, cache_implementation="static", **settings)
        prompt = presents[0][:, 0, :]  # the prefill: [T, G] of the one group
        assert [len(p) for p in presents] == [8, 1, 1, 1]
        uncached = mot.generate(ids, use_cache=False, **settings)
    torch.testing.assert_close(prompt, mask.bool().t())
    assert all(p.all() for p in presents[1:4])  # the generated tokens are real
    torch.testing.assert_close(static, uncached, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- Funnel


def test_funnel_pooled_blocks_refuse_a_padded_mask_instead_of_dropping_real_tokens():
    model = _family("funnel")
    example = {
        "input_ids": torch.randint(3, 100, (3, 8)),
        "attention_mask": torch.ones(3, 8, dtype=torch.long),
    }
    mot = mc.convert(model, **MOT, example_inputs=example).eval()
    ids = torch.randint(3, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad(), pytest.raises(mc.ShapeError, match=r"funnel\.encoder\.blocks\.1\..*\(2, 16\)"):
        mot(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # unpadded, the pooled blocks see every token present
        y = mot(input_ids=ids, attention_mask=torch.ones(2, 16, dtype=torch.long)).logits
        torch.testing.assert_close(y, mot(input_ids=ids).logits)


def test_funnel_converts_with_a_note_when_its_built_inputs_are_padded():
    """convert's own probe pads one position: the pooled blocks refuse it, which is a note, not a failure."""
    mot, report = mc.convert_with_report(_family("funnel"), **MOT)
    assert any("no model-level verification: on padded inputs built from it" in n for n in report.notes)
    assert report.converted and len(mc.sparse_blocks(mot)) == sum(
        s.status == "converted" for s in report.sites
    )


# --------------------------------------------------------------------------------------------- FSMT


@pytest.fixture(scope="module")
def fsmt() -> nn.Module:
    torch.manual_seed(0)
    return mc.convert(_family("fsmt"), **MOT).eval()


def test_fsmt_decoder_blocks_do_not_take_the_encoders_mask(fsmt):
    block = fsmt.get_submodule("model.decoder.layers.0.fc1")
    seen = _record(block)
    ids = torch.randint(3, 100, (2, 8))
    enc_mask = torch.ones(2, 8, dtype=torch.long)
    enc_mask[0, -3:] = 0
    dec = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        fsmt(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec)
        assert seen["present"].all()
        # the block computed what it computes with no mask: no real decoder token zeroed
        torch.testing.assert_close(seen["y"], block(seen["x"]))
        assert (seen["y"].norm(dim=-1) > 0).all()


def test_fsmt_decoder_blocks_take_the_decoder_attention_mask(fsmt):
    block = fsmt.get_submodule("model.decoder.layers.0.fc1")
    encoder_block = fsmt.get_submodule("model.encoder.layers.0.fc1")
    seen, seen_encoder = _record(block), _record(encoder_block)
    ids = torch.randint(3, 100, (2, 8))
    enc_mask = torch.ones(2, 8, dtype=torch.long)
    enc_mask[1, -2:] = 0
    dec = torch.randint(3, 100, (2, 6))
    dec_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask[0, -2:] = 0
    with torch.no_grad():
        fsmt(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        assert seen["present"][:, 0, :].T.tolist() == dec_mask.bool().tolist()
        assert seen_encoder["present"][:, 0, :].T.tolist() == enc_mask.bool().tolist()
        with mc.token_mask(block, dec_mask):
            expected = block(seen["x"])
    torch.testing.assert_close(seen["y"], expected)


def test_fsmt_decoder_longer_than_the_encoder_input_runs(fsmt):
    ids, dec = torch.randint(3, 100, (2, 4)), torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        out = fsmt(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long), decoder_input_ids=dec)
    assert out.logits.shape[:2] == (2, 6)


def test_fsmt_generates_from_right_padded_sources_without_zeroing_decoder_tokens(fsmt):
    block = fsmt.get_submodule("model.decoder.layers.0.fc1")
    outputs: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, o: outputs.append(o))
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -3:] = 0
    try:
        with torch.no_grad():
            fsmt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=1)
    finally:
        handle.remove()
    assert outputs and all((o.norm(dim=-1) > 0).all() for o in outputs)


def test_t5_decoder_stack_keeps_its_own_mask():
    """T5's decoder stack is hooked itself: the innermost hook still gives its blocks the decoder mask."""
    torch.manual_seed(0)
    mot = mc.convert(build("t5"), **MOT).eval()
    blocks = [b for n, b in mot.named_modules() if isinstance(b, MoTBlock) and n.startswith("decoder")]
    seen = _record(blocks[0])
    ids, dec = torch.randint(3, 100, (2, 8)), torch.randint(3, 100, (2, 5))
    dec_mask = torch.ones(2, 5, dtype=torch.long)
    dec_mask[1, -2:] = 0
    with torch.no_grad():
        mot(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long), decoder_input_ids=dec,
            decoder_attention_mask=dec_mask)  # fmt: skip
    assert seen["present"][:, 0, :].T.tolist() == dec_mask.bool().tolist()


# --------------------------------------------------------------------------------------- ProphetNet


def test_prophetnet_decoder_mask_error_says_what_the_block_sees():
    torch.manual_seed(0)
    mot = mc.convert(_family("prophetnet"), **MOT).eval()
    ids, dec = torch.randint(3, 100, (2, 8)), torch.randint(3, 100, (2, 6))
    dec_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask[0, -2:] = 0
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "decoder_input_ids": dec,
    }
    with torch.no_grad(), pytest.raises(mc.ShapeError) as error:
        mot(**inputs, decoder_attention_mask=dec_mask)
    message = str(error.value)
    assert "prophetnet.decoder.layers.0" in message and "18 tokens" in message and "(2, 6)" in message
    assert "more than" in message and "mixcompile.token_mask" in message
    assert "cache" not in message
    with torch.no_grad():
        mot(**inputs)  # without a decoder mask it runs


# ------------------------------------------------------------------------------------------- mixer


def test_bf16_controller_scores_are_computed_in_float32():
    torch.manual_seed(0)
    d, experts, group = 256, 8, 8
    block = MoTBlock(d, 64, experts, group_size=group, mixer_options={"init_std": 0.5}).to(torch.bfloat16)
    x = torch.randn(group, 4, d).to(torch.bfloat16)
    x_g = x.reshape(1, group, 4, d).permute(2, 0, 1, 3)  # [T, n, G, d]
    present = torch.ones(1, 1, group, dtype=torch.bool)
    plan = block.mixer(x_g, present, sparse=False)
    weight = block.mixer.controller.weight
    exact = torch.softmax(x_g.double() @ weight.double().T, dim=2)
    assert plan.merge.dtype == torch.bfloat16
    assert (plan.merge.double() - exact).abs().max() < 4e-3  # bf16 rounding of the weights (1e-2 before)
    plan.merge.float().square().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16 and weight.grad.abs().sum() > 0


def test_controller_scores_read_the_blocks_permuted_input_in_memory_order():
    """The block hands the mixer a permuted view of its batch: the float32 product reads it in memory order,
    so the input is copied once (the upcast), not a second time into row order; the scores equal those of
    a contiguous copy and come back contiguous, in [T, n, G, E] order."""
    torch.manual_seed(0)
    d, experts, group = 64, 4, 2
    block = MoTBlock(d, 32, experts, group_size=group, mixer_options={"init_std": 0.5}).to(torch.bfloat16)
    x_g = torch.randn(2 * group, 5, d).to(torch.bfloat16).reshape(2, group, 5, d).permute(2, 0, 1, 3)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        scores = block.mixer.logits(x_g)
    input_sized = [e for e in prof.events() if e.self_cpu_memory_usage >= x_g.numel() * 4]
    assert len(input_sized) == 1, [e.name for e in input_sized]
    assert scores.shape == (5, 2, group, experts) and scores.is_contiguous()
    torch.testing.assert_close(scores, block.mixer.logits(x_g.contiguous()))


class _BiasedController(nn.Linear):
    """A controller a user swapped in: a subclass with a bias (a LoRA-wrapped layer is another kind)."""


def test_a_controller_other_than_a_plain_linear_runs_its_own_forward():
    """The float32 product is for a plain nn.Linear; a subclass's bias, a wrapper's extra terms and hooks
    on the controller are part of its scores."""
    torch.manual_seed(0)
    mixer = MoTBlock(8, 16, 4, group_size=2).mixer
    x = torch.randn(3, 1, 2, 8)
    plain = mixer.logits(x)
    torch.testing.assert_close(plain, x @ mixer.controller.weight.T)
    biased = _BiasedController(8, 4, bias=True)
    with torch.no_grad():
        biased.weight.copy_(mixer.controller.weight)
        biased.bias.fill_(0.5)
    mixer.controller = biased
    torch.testing.assert_close(mixer.logits(x), plain + 0.5)
    calls: list[int] = []
    mixer.controller = nn.Linear(8, 4, bias=False)
    mixer.controller.register_forward_hook(lambda m, a, out: calls.append(1) or out * 2)
    torch.testing.assert_close(mixer.logits(x), 2 * (x @ mixer.controller.weight.T))
    assert calls == [1]


def test_temperature_sharpens_the_group_softmax_not_the_emit_over_experts():
    torch.manual_seed(0)
    x_g = torch.randn(3, 1, 4, 16)  # [T, n, G, d]
    present = torch.ones(1, 1, 4, dtype=torch.bool)
    block = MoTBlock(16, 8, 4, group_size=4, mixer_options={"emit": "experts", "init_std": 0.5})
    scores = x_g.double() @ block.mixer.controller.weight.double().T
    for tau in (1.0, 0.05):
        block.mixer.temperature = tau
        plan = block.mixer(x_g, present, sparse=False)
        torch.testing.assert_close(
            plan.merge.double(), torch.softmax(scores / tau, dim=2), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(plan.emit.double(), torch.softmax(scores, dim=3), rtol=1e-5, atol=1e-6)


def test_a_token_hook_pickled_before_parts_still_runs():
    """Whole-model pickles (torch.save(model)) of an earlier mixcompile hold hooks with one spec."""
    import pickle

    from mixcompile.runtime.tokens import TokenContextHook

    mot = _pooling_mot()
    hook = next(h for h in mot._forward_pre_hooks.values() if isinstance(h, TokenContextHook))
    ((spec, blocks),) = hook.parts
    old = TokenContextHook.__new__(TokenContextHook)
    old.__dict__.update(spec=spec, blocks=blocks, positions=hook.positions)  # the earlier attributes
    again = pickle.loads(pickle.dumps(old))
    assert [(s.mask, len(b)) for s, b in again.parts] == [(spec.mask, 1)]
