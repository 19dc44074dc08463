"""One kernel boundary: the kernel plugin decides everything that runs on a device (routing included), and
Triton is imported only by the Triton kernel plugin, so mixcompile works where Triton is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mixcompile as mc

# Runs in a fresh interpreter. ``sys.modules["triton"] = None`` is what an interpreter without Triton
# sees: ``import triton`` fails and ``importlib.util.find_spec("triton")`` is None.
WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None
"""

QUICKSTART = """
import torch, torch.nn.functional as F
import mixcompile as mc
from mixcompile.cli import main

assert main(["demo"]) == 0
model = mc.convert(mc.build_tiny_gpt(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq=16),
                   strategy="moe", num_experts=4, top_k=2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
tokens = torch.randint(0, 256, (4, 9))
loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) + mc.aux_loss(model)
loss.backward()
optimizer.step()
mc.save(model, sys.argv[1])
again = mc.load(sys.argv[1])
torch.testing.assert_close(again.eval()(tokens), model.eval()(tokens))
assert mc.MoEBlock(8, 16, 4).kernel_for("cpu", torch.float32) == "torch"
try:
    mc.MoEBlock(8, 16, 4, kernel="triton")(torch.randn(3, 8))
except mc.ConfigError as error:
    assert "kernel 'triton' does not support moe blocks" in str(error), error
else:
    raise AssertionError("the Triton kernel claimed to run without Triton")
print("ok", "triton" in sys.modules and sys.modules["triton"] is not None)
"""


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_mixcompile_imports_converts_trains_and_saves_without_triton(tmp_path) -> None:
    result = run(WITHOUT_TRITON + QUICKSTART, str(tmp_path / "saved"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok False"), result.stdout


def test_the_torch_kernel_never_imports_triton_even_where_it_could_run(tmp_path) -> None:
    """Under the interpreter Triton could run on this CPU; ``kernel="torch"`` still never touches it."""
    script = """
    import sys, torch, torch.nn.functional as F
    import mixcompile as mc
    model = mc.convert(mc.build_tiny_gpt(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq=16),
                       strategy="moe", num_experts=4, top_k=2, kernel="torch")
    mot = mc.convert(mc.build_tiny_gpt(d_model=32, n_layer=2, n_head=2, d_ff=64, max_seq=16),
                     strategy="mot", num_experts=4, group_size=2, kernel="torch")
    tokens = torch.randint(0, 256, (4, 8))
    for m in (model, mot):
        F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
    # torch may import triton for its own use; what matters is that no mixcompile Triton code was loaded.
    print("loaded:", sorted(m for m in sys.modules if m.startswith("mixcompile_plugins.triton.")))
    """
    result = run(script, env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: ['mixcompile_plugins.triton.plugin']"


def test_kernels_implement_the_protocol() -> None:
    for name in mc.registry().names("kernel"):
        kernel = mc.registry().get("kernel", name).factory()
        assert isinstance(kernel, mc.Kernel), name
        assert not isinstance(kernel, torch.nn.Module)  # one object per process, no per-block state


def test_routers_and_mixers_implement_their_protocols() -> None:
    for name in mc.registry().names("router"):
        top_k = 1 if name == "switch" else 2
        router = mc.registry().get("router", name).factory(8, 4, top_k)
        assert isinstance(router, mc.Router) and isinstance(router, torch.nn.Module), name
    hash_router = mc.registry().get("router", "hash").factory(8, 4, 2)
    assert not isinstance(hash_router, mc.LearnedRouter) and not hasattr(hash_router, "gate")
    mixer = mc.registry().get("mixer", "softmax").factory(8, 4, 2)
    assert isinstance(mixer, mc.Mixer) and isinstance(mixer, mc.ControllerMixer)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_routing_reference(renormalize) -> None:
    logits = torch.randn(7, 5, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0], dtype=torch.float64)  # forces expert 4 into every pick
    probs, chosen, weights = mc.topk_routing(logits, 2, bias=bias, renormalize=renormalize)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert (chosen[:, 0] == 4).all()
    kept = probs.gather(-1, chosen)
    torch.testing.assert_close(weights, kept / kept.sum(-1, keepdim=True) if renormalize else kept)


def test_auto_runs_mot_through_the_einsum_on_cuda_and_moe_through_triton() -> None:
    """Measured on an H100 (README Performance): the fused MoT training step is about 2x slower than the
    torch kernel's einsum, the fused MoE forward faster than the alternatives. ``auto`` follows; a block
    that names Triton still gets it. (``kernel_for`` resolves without a GPU: nothing runs.)"""
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert mc.MoTBlock(8, 16, 4, group_size=2).kernel_for(cuda, torch.bfloat16) == "torch"
    assert mc.MoEBlock(8, 16, 4, top_k=2).kernel_for(cuda, torch.bfloat16) == "triton"
    named = mc.MoTBlock(8, 16, 4, group_size=2, kernel="triton")
    assert named.kernel_for(cuda, torch.bfloat16) == "triton"


class _RanksItselfDownForMoE(mc.Kernel):
    """A high-priority kernel that steps back for MoE blocks through the optional ``auto_priority``."""

    priority = 100

    def supports(self, kind, device, dtype):
        return True

    def auto_priority(self, kind, device, dtype):
        return -100 if kind == "moe" else self.priority

    def mot(self, x_g, plan, experts):
        return mc.registry().get("kernel", "torch").factory().mot(x_g, plan, experts)


class _RankingPlugin:
    @mc.hookimpl
    def register_kernels(self, register):
        register("ranked", _RanksItselfDownForMoE)


def test_a_kernel_ranks_itself_per_input_for_auto(fresh_registry) -> None:
    mc.register_plugin(_RankingPlugin(), name="ranking_plugin")
    assert mc.MoTBlock(8, 16, 4, group_size=2).kernel_for("cpu", torch.float32) == "ranked"
    assert mc.MoEBlock(8, 16, 4, top_k=2).kernel_for("cpu", torch.float32) == "torch"
    assert mc.MoEBlock(8, 16, 4, top_k=2, kernel="ranked").kernel_for("cpu", torch.float32) == "ranked"
    x = torch.randn(4, 3, 8)
    block = mc.MoTBlock(8, 16, 4, group_size=2)
    block(x)
    assert block.last_stats["kernel"] == "ranked"
