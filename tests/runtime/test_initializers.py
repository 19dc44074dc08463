import pytest
import torch

import mixcompile as mc


def make_dense(h=24, d=8, gated=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mc.DenseFFN(
        torch.randn(h, d, generator=g),
        torch.randn(d, h, generator=g),
        "relu",
        w_gate=torch.randn(h, d, generator=g) if gated else None,
        b_in=torch.randn(h, generator=g) if bias else None,
        b_out=torch.randn(d, generator=g) if bias else None,
    )


def experts_for(dense, num_experts, hidden):
    return mc.StackedExperts(
        num_experts, dense.d_model, hidden, activation="relu", gated=dense.gated, bias=dense.has_bias
    )


def initialize(name, experts, dense, **options):
    with torch.no_grad():
        mc.registry().get("initializer", name).factory(experts, dense, **options)


def test_upcycle_copies_every_expert_and_noise_breaks_symmetry():
    dense = make_dense(bias=True, gated=True)
    experts = experts_for(dense, 3, 24)
    initialize("upcycle", experts, dense)
    for e in range(3):
        assert torch.equal(experts.w_in[e], dense.w_in) and torch.equal(experts.w_gate[e], dense.w_gate)
        assert torch.equal(experts.w_out[e], dense.w_out) and torch.equal(experts.b_out[e], dense.b_out)
    initialize("upcycle", experts, dense, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(experts.w_in[0], experts.w_in[1])
    relative = (experts.w_in[0] - dense.w_in).detach().std() / dense.w_in.std()
    assert 0.005 < float(relative) < 0.02


@pytest.mark.parametrize("method", ["random", "balanced"])
def test_split_partitions_the_hidden_neurons(method):
    dense = make_dense(gated=True, bias=True)
    experts = experts_for(dense, 4, 6)
    initialize("split", experts, dense, method=method, generator=torch.Generator().manual_seed(0))
    rows = [tuple(r.tolist()) for r in experts.w_in.reshape(-1, 8)]
    assert sorted(rows) == sorted(tuple(r.tolist()) for r in dense.w_in)  # each neuron exactly once
    x = torch.randn(5, 8, dtype=torch.float64)
    total = experts.double().batched_forward(x.expand(4, -1, -1)).sum(0)  # every expert on x
    expected = dense.forward(x.float()).double()
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-5)


def test_balanced_split_groups_similar_neurons():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=g)]
    w_in = centres[labels] + 0.1 * torch.randn(32, 16, generator=g)
    dense = mc.DenseFFN(w_in, torch.randn(16, 32, generator=g), "relu")
    experts = experts_for(dense, 4, 8)
    initialize("split", experts, dense, method="balanced", generator=g)
    for e in range(4):
        picked = [int((w_in == row).all(1).nonzero()) for row in experts.w_in[e]]
        assert len(set(labels[picked].tolist())) == 1


def test_random_ignores_the_dense_ffn_and_is_seeded():
    dense = make_dense()
    a, b = experts_for(dense, 2, 24), experts_for(dense, 2, 24)
    initialize("random", a, None, generator=torch.Generator().manual_seed(5))
    initialize("random", b, dense, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.w_in, b.w_in)
    assert not torch.equal(a.w_in[0], dense.w_in)
    assert a.w_in.abs().max().item() <= 1 / 8**0.5
    # it is the experts' own reset_parameters (nn.Linear's init), biases included
    c = mc.StackedExperts(2, 8, 24, activation="relu", gated=True, bias=True)
    d = mc.StackedExperts(2, 8, 24, activation="relu", gated=True, bias=True)
    initialize("random", c, None, generator=torch.Generator().manual_seed(5))
    d.reset_parameters(torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters(), strict=True))


@pytest.mark.parametrize(
    "name,hidden,options,match",
    [
        ("upcycle", 12, {}, r"expert hidden size \(12\) must equal the dense one \(24\)"),
        ("split", 5, {}, "the expert hidden size must be 24 / 4"),
        ("split", 6, {"method": "kmeans"}, "unknown method 'kmeans'"),
        ("upcycle", 24, {"noise": -1.0}, "noise must be a finite number >= 0"),
    ],
)
def test_initializer_errors(name, hidden, options, match):
    dense = make_dense()
    with pytest.raises(mc.ConfigError, match=match):
        initialize(name, experts_for(dense, 4, hidden), dense, **options)


def test_copying_initializers_need_a_dense_ffn():
    experts = experts_for(make_dense(), 2, 24)
    with pytest.raises(mc.ConfigError, match="initializer 'upcycle' copies a dense FFN, but none was given"):
        initialize("upcycle", experts, None)


def test_dense_ffn_validates_shapes():
    with pytest.raises(mc.ShapeError, match=r"DenseFFN.w_out has shape \(8, 23\), expected \(8, 24\)"):
        mc.DenseFFN(torch.randn(24, 8), torch.randn(8, 23), "relu")
    with pytest.raises(mc.UnknownNameError, match="unknown activation 'rleu'"):
        mc.DenseFFN(torch.randn(24, 8), torch.randn(8, 24), "rleu")
