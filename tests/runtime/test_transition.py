"""Transition tuning: the temperature schedule, the MoT -> Token Choice switch, and that tuning after the
switch makes a MoT model usable one sequence at a time."""

import math

import pytest
import torch
import torch.nn.functional as F

import mixcompile as mc

D, FF, SEQ, BATCH, G, E = 32, 64, 24, 8, 4, 8


def tiny_mot(seed=0, **options):
    torch.manual_seed(seed)
    base = mc.TinyGPT(d_model=D, n_layer=2, n_head=2, d_ff=FF, max_seq=SEQ)
    recipe = {"num_experts": E, "group_size": G, "sizing": "flop", "init": "random", **options}
    return mc.convert(base, strategy="mot", verify=False, **recipe)


def test_schedule_is_geometric_from_start_to_end():
    temps = [mc.temperature_schedule(step, 10, start=2.0, end=0.02) for step in range(13)]
    assert temps[0] == pytest.approx(2.0) and temps[10] == pytest.approx(0.02)
    assert temps[10:] == [temps[10]] * 3  # held at the end after the last step
    ratios = [b / a for a, b in zip(temps[:10], temps[1:11], strict=True)]
    assert ratios == pytest.approx([0.01 ** (1 / 10)] * 10)  # the same factor every step
    assert temps[5] == pytest.approx(math.sqrt(2.0 * 0.02))


@pytest.mark.parametrize(
    ("step", "steps", "options"),
    [(-1, 10, {}), (0, 0, {}), (0, 10, {"end": 0.0}), (0, 10, {"start": -1.0}), (0, 10, {"end": math.inf})],
)
def test_schedule_refuses_bad_arguments(step, steps, options):
    with pytest.raises(mc.ConfigError):
        mc.temperature_schedule(step, steps, **options)


def test_set_temperature_sharpens_every_mix():
    model = tiny_mot(mixer_options={"init_std": 0.5})
    tokens = torch.randint(0, 256, (BATCH, SEQ))
    entropies = []
    for temperature in (1.0, 0.05):
        assert mc.set_mot_temperature(model, temperature) == 2
        model(tokens)
        entropies.append([s["merge_entropy"] for s in mc.stats(model).values()])
    assert all(cold < 0.5 * warm for warm, cold in zip(*entropies, strict=True))
    for bad in (0.0, 1e-300, True, "1"):  # 1e-300: the logits overflow, and the mix would be NaN
        with pytest.raises(mc.ConfigError, match="temperature must be a"):
            mc.set_mot_temperature(model, bad)
    assert all(b.mixer.temperature == 0.05 for b in mc.sparse_blocks(model).values())  # left as they were
    with pytest.raises(TypeError, match="set_mot_temperature takes the converted torch.nn.Module, got str"):
        mc.set_mot_temperature("model", 0.5)
    with pytest.raises(TypeError, match="to_token_choice takes the converted torch.nn.Module"):
        mc.to_token_choice(None)
    assert mc.set_mot_temperature(mc.TinyGPT(d_model=D, n_layer=1, n_head=2, d_ff=FF), 0.5) == 0


def test_token_choice_keeps_experts_and_routes_with_the_controller():
    model = tiny_mot()
    before = {path: block for path, block in mc.sparse_blocks(model).items()}
    assert mc.to_token_choice(model) == list(before)
    for path, block in mc.sparse_blocks(model).items():
        mot = before[path]
        assert isinstance(block, mc.MoEBlock) and block.top_k == E // G  # FLOPs per token unchanged
        torch.testing.assert_close(block.experts.w_in, mot.experts.w_in)
        torch.testing.assert_close(block.experts.w_out, mot.experts.w_out)
        torch.testing.assert_close(block.router.gate.weight, mot.mixer.controller.weight)
        assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in mot.parameters())


def test_an_optimizer_built_before_the_switch_keeps_training_the_experts():
    """The switch copied the weights into new parameters: an optimizer built before it (as a training
    loop holds one) no longer saw the experts or the router, which then never moved again."""
    model = tiny_mot()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mot = next(iter(mc.sparse_blocks(model).values()))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mc.to_token_choice(model)
    block = next(iter(mc.sparse_blocks(model).values()))
    assert {id(p) for p in block.parameters()} <= held and block.experts is mot.experts
    before = [p.detach().clone() for p in block.parameters()]
    tokens = torch.randint(0, 256, (BATCH, SEQ))
    (model(tokens).square().mean() + mc.aux_loss(model)).backward()
    optimizer.step()
    assert all(not torch.equal(p, old) for p, old in zip(block.parameters(), before, strict=True))


def test_token_choice_does_not_depend_on_the_batch():
    model = tiny_mot(mixer_options={"init_std": 0.5}).eval()
    tokens = torch.randint(0, 256, (BATCH, SEQ))
    mixed = model(tokens)[:1]
    assert not torch.allclose(model(tokens[:1]), mixed, atol=1e-4)  # MoT: batch 1 is another function
    mc.to_token_choice(model)
    torch.testing.assert_close(model(tokens[:1]), model(tokens)[:1], rtol=1e-5, atol=1e-5)


def test_token_choice_refuses_without_changing_anything():
    model = tiny_mot()
    with pytest.raises(mc.ConfigError, match="top_k"):
        mc.to_token_choice(model, top_k=E + 1)
    assert all(isinstance(b, mc.MoTBlock) for b in mc.sparse_blocks(model).values())
    with pytest.raises(mc.ConfigError, match="no MoTBlock"):
        mc.to_token_choice(mc.TinyGPT(d_model=D, n_layer=1, n_head=2, d_ff=FF))
    with pytest.raises(mc.ConfigError, match="itself a MoTBlock"):
        mc.to_token_choice(mc.MoTBlock(D, FF, E, group_size=G))


def markov_text(length: int, seed: int) -> torch.Tensor:
    """Bytes from a fixed random order-1 Markov chain over 16 symbols: learnable, and never-ending."""
    generator = torch.Generator().manual_seed(1)  # the same chain for every seed
    table = torch.softmax(3 * torch.randn(16, 16, generator=generator), dim=-1)
    sampler = torch.Generator().manual_seed(seed)
    out = [0]
    for _ in range(length - 1):
        out.append(int(torch.multinomial(table[out[-1]], 1, generator=sampler)))
    return torch.tensor(out)


def fit(model, data, steps, lr):
    windows = data.unfold(0, SEQ + 1, SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = windows[(step * BATCH + torch.arange(BATCH)) % len(windows)]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) + mc.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def held_out_loss(model, data, batch):
    windows = data.unfold(0, SEQ + 1, SEQ)[: 4 * BATCH]
    model.eval()
    losses = []
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        losses.append(F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten()))
    return torch.stack(losses).mean().item()


def test_transition_tuning_makes_batch_one_close_to_batch_g():
    train, val = markov_text(6000, seed=0), markov_text(4 * BATCH * SEQ + 1, seed=1)
    model = tiny_mot(seed=0)
    fit(model, train, steps=120, lr=3e-3)
    for block in mc.sparse_blocks(model).values():
        block.small_batch = "sparse"
    grouped = held_out_loss(model, val, BATCH)
    alone = held_out_loss(model, val, 1)  # each expert takes the lone sequence: all experts at once
    mc.to_token_choice(model)
    fit(model, train, steps=30, lr=1e-3)
    tuned = held_out_loss(model, val, 1)
    gap = alone - grouped
    assert gap > 0.1  # the problem is there to solve
    assert tuned - grouped < 0.25 * gap  # batch 1 now costs at most a quarter of what it did ...
    assert abs(tuned - grouped) < 0.5 * gap  # ... and is closer to batch G, from either side
    assert held_out_loss(model, val, BATCH) == pytest.approx(tuned, abs=1e-5)  # and batch-independent


@pytest.mark.parametrize(
    ("experts", "group", "fragment"), [(6, 4, "not a whole number"), (4, 4, "top-1 router")]
)
def test_a_default_top_k_that_is_not_e_over_g_or_is_one_is_refused(experts, group, fragment):
    """E/G is the top_k that keeps the FLOPs per token; 6/4 would have been floored to a top-1 router."""
    model = torch.nn.Sequential(mc.MoTBlock(D, FF, experts, group_size=group))
    with pytest.raises(
        mc.ConfigError, match=rf"E={experts} experts and groups of G={group}.*{fragment}.*top_k="
    ):
        mc.to_token_choice(model)
    assert isinstance(model[0], mc.MoTBlock)  # nothing replaced
    mc.to_token_choice(model, top_k=2)
    assert model[0].router.top_k == 2
