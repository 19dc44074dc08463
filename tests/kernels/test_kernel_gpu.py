"""The Triton kernels at real sizes on a GPU (tiny sizes under Triton's CPU interpreter elsewhere), against a
float64 plain-PyTorch reference: the output with and without grad and every gradient, in fp32 (torch's
"highest" and "high" matmul precisions) and bf16; ``torch.compile(fullgraph=True)``; CUDA-graph capture;
expert weights laid out as transformers stores them.
On a GPU each launch runs the first autotune config that fits (the benchmark tunes, and checks what wins).

Outputs are poisoned: every ``torch.empty`` is NaN-filled while the kernels run, so an element a kernel does
not write fails the comparison (``torch.testing.assert_close`` fails on NaN). ``benchmarks/gpu_check.sh``
runs this file first on a GPU.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import mixcompile as mc
from mixcompile.runtime.routing import RoutingPlan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (tokens, d_model, experts, top_k, hidden, gated): coarse and fine-grained MoE, as benchmarked
MOE = [(4096, 1024, 8, 2, 1024, True), (4096, 1024, 64, 8, 512, False)]
MOE = MOE if CUDA else [(40, 32, 4, 2, 48, True)]
# (batch, seq, d_model, group, experts, hidden)
MOT = [(16, 256, 1024, 16, 32, 512)] if CUDA else [(6, 5, 32, 4, 4, 32)]
# name -> (dtype, torch.set_float32_matmul_precision, relative tolerance)
PRECISIONS = {
    "fp32": (torch.float32, "highest", 1e-4),
    "tf32": (torch.float32, "high", 1e-2),
    "bf16": (torch.bfloat16, "highest", 3e-2),
}


def _import_triton() -> None:
    """Import the kernels in interpreter mode when there is no GPU (Triton reads the variable at import)."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        triton = pytest.importorskip("triton")
        importlib.import_module("mixcompile_plugins.triton.ops")
    if not CUDA and type(triton.language.cdiv).__name__ != "InterpretedFunction":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set; run this file on its own",
            allow_module_level=True,
        )


_import_triton()


@pytest.fixture(autouse=True)
def kernel_env(request):
    """Interpreter mode on CPU, NaN-filled allocations and the precision asked."""
    params = getattr(request.node, "callspec", None)  # a test that is not parametrized has none
    precision = PRECISIONS[params.params.get("precision", "fp32") if params else "fp32"][1]
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
        if CUDA:  # one config per launch (the first that fits): compiling every candidate would take minutes
            from mixcompile_plugins.triton import grouped, tuning

            for tuner in (k for k in vars(grouped).values() if isinstance(k, tuning.Autotuner)):
                first = lambda kwargs, prune=tuner.prune_configs: prune(kwargs)[:1]  # noqa: E731
                mp.setattr(tuner, "prune_configs", first)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)
            torch.use_deterministic_algorithms(deterministic)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Relative to the reference's scale: the norm of the error, and every element (NaN fails both)."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=0.0, atol=tol * scale, msg=lambda m: f"{what}: {m}")
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _kernel(name: str):
    from mixcompile.runtime.kernels import get_kernel

    return get_kernel(name)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor | None]:
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return list(torch.autograd.grad(out, inputs, cotangent, allow_unused=True))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sizes", MOE, ids=lambda s: f"E{s[2]}k{s[3]}h{s[4]}")
def test_moe_against_float64(sizes, precision):
    tokens, d, e, k, h, gated = sizes
    dtype, _, tol = PRECISIONS[precision]
    torch.manual_seed(0)
    experts = mc.StackedExperts(e, d, h, activation="silu" if gated else "gelu", gated=gated, bias=True)
    experts = experts.to(DEVICE, dtype)
    x = (torch.randn(tokens, d) * 0.5).to(DEVICE, dtype)
    chosen = torch.rand(tokens, e).argsort(dim=1)[:, :k].reshape(-1)  # k distinct experts per token
    weight = torch.rand(tokens * k).to(DEVICE)
    tokens_index = torch.arange(tokens).repeat_interleave(k)
    # bf16 runs as routers and transformers' experts do (pairs_per_token declared: no sort by token), fp32
    # and tf32 without it and with the pairs shuffled (as expert choice lists them: each token's pairs are
    # counted and listed on the GPU), so both ways of listing each token's pairs run at real sizes
    declared = k if precision == "bf16" else None
    if declared is None:
        shuffle = torch.randperm(tokens * k)
        tokens_index, chosen = tokens_index[shuffle], chosen[shuffle]
    tokens_index = tokens_index.to(DEVICE)

    def run(kernel, experts, x, weight):
        x = x.detach().clone().requires_grad_()
        weight = weight.detach().clone().requires_grad_()
        plan = RoutingPlan(tokens_index, chosen.to(DEVICE), weight, tokens, e, pairs_per_token=declared)
        y = kernel.moe(x, plan, experts)
        with torch.no_grad():
            y_infer = kernel.moe(x, plan, experts)
        inputs = [x, weight, *experts.parameters()]
        return y, y_infer, _grads(y, inputs, 1)

    y, y_infer, grads = run(_kernel("triton"), experts, x, weight)
    ref = copy.deepcopy(experts).double()
    y_ref, _, grads_ref = run(_kernel("torch"), ref, x.double(), weight.double())
    assert_close(y, y_ref, tol, "output")
    assert_close(y_infer, y_ref, tol, "output without grad")
    names = ["x", "weight", *(n for n, _ in experts.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(g, g_ref, tol, f"grad {name}")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sizes", MOT, ids=lambda s: f"G{s[3]}E{s[4]}h{s[5]}")
def test_mot_block_against_float64(sizes, precision):
    batch, seq, d, group, e, h = sizes
    dtype, _, tol = PRECISIONS[precision]
    torch.manual_seed(1)
    block = mc.MoTBlock(d, h, e, group_size=group, kernel="triton", device=DEVICE, dtype=dtype)
    ref = copy.deepcopy(block).double()
    ref.kernel = "torch"
    x = (torch.randn(batch, seq, d) * 0.5).to(DEVICE)
    outs = []
    for b, xi in ((block, x.to(dtype)), (ref, x.double())):
        xi = xi.clone().requires_grad_()
        y = b(xi)
        with torch.no_grad():
            y_infer = b(xi)
        outs.append((y, y_infer, _grads(y, [xi, *b.parameters()], 2)))
    (y, y_infer, grads), (y_ref, _, grads_ref) = outs
    assert block.last_stats["kernel"] == "triton"
    assert_close(y, y_ref, tol, "output")
    assert_close(y_infer, y_ref, tol, "output without grad")
    names = ["x", *(n for n, _ in block.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        if g_ref is None or not g_ref.any():
            assert g is None or not g.any(), name
        else:
            assert_close(g, g_ref, tol, f"grad {name}")


@pytest.mark.parametrize("kind", ["moe", "mot"])
def test_torch_compile_fullgraph(kind):
    """The whole block compiles as one graph around the kernel's custom ops (inductor on a GPU)."""
    torch.manual_seed(2)
    tokens, d, e, k, h, _ = MOE[0]
    dtype = torch.bfloat16 if CUDA else torch.float32
    if kind == "moe":
        block = mc.MoEBlock(d, h, e, top_k=k, gated=True, kernel="triton", device=DEVICE, dtype=dtype)
        x = torch.randn(4, tokens // 4, d, device=DEVICE, dtype=dtype)
    else:
        batch, seq, d, group, e, h = MOT[0]
        block = mc.MoTBlock(d, h, e, group_size=group, kernel="triton", device=DEVICE, dtype=dtype)
        x = torch.randn(batch, seq, d, device=DEVICE, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    outs = []
    for fn in (block, compiled):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        outs.append((y, _grads(y, [xi, *block.parameters()], 3)))
    (y, grads), (y_c, grads_c) = outs
    assert_close(y_c, y, tol, "compiled output")
    for g, g_c in zip(grads, grads_c, strict=True):
        if g is not None:
            assert_close(g_c, g, tol, "compiled grad")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_replays_the_eager_result():
    """Captured after one eager (tuning) step, the kernels replay what they compute eagerly."""
    torch.manual_seed(3)
    block = mc.MoEBlock(1024, 512, 64, top_k=8, kernel="triton", device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = block(x)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = block(static_x)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        want = block(static_x)
    assert_close(static_y, want, 1e-2, "replayed output")
    assert not torch.equal(static_y, eager)  # the replay computed on the new input


@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "transposed"])
def test_transformers_weight_layouts_against_float64(layout):
    """Expert weights as transformers stores them (a fused gate_up_proj, halves or interleaved, plain or
    transposed), read in place through their strides, split as the transformers integration splits them
    (the Triton kernel writes the fused weight's gradient in one piece): bf16 output and the gradients of
    the fused tensors."""
    from mixcompile.integrations.transformers_experts import ExpertsView, _gate_up_halves

    tokens, d, e, k, h, _ = MOE[0]
    tol = PRECISIONS["bf16"][2]
    transposed = layout == "transposed"
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn((e, d, 2 * h) if transposed else (e, 2 * h, d), generator=g) / d**0.5
    down = torch.randn((e, h, d) if transposed else (e, d, h), generator=g) / h**0.5
    x = torch.randn(tokens, d, generator=g) * 0.5
    chosen = torch.rand(tokens, e, generator=g).argsort(dim=1)[:, :k].reshape(-1)
    weight = torch.rand(tokens * k, generator=g)

    def run(kernel, dtype):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, gate_up, down)]
        w_out = leaves[2].mT if transposed else leaves[2]
        gate, up = _gate_up_halves(leaves[1], h, layout != "interleaved", transposed)
        experts = ExpertsView(up, gate, w_out, None, None, None, "silu")
        tokens_index = torch.arange(tokens).repeat_interleave(k).to(DEVICE)
        plan = RoutingPlan(
            tokens_index, chosen.to(DEVICE), weight.to(DEVICE, dtype), tokens, e, pairs_per_token=k
        )
        y = kernel.moe(leaves[0], plan, experts)
        return y, _grads(y, leaves, 2)

    y, grads = run(_kernel("triton"), torch.bfloat16)
    y_ref, grads_ref = run(_kernel("torch"), torch.float64)
    assert_close(y, y_ref, tol, "output")
    for name, got, want in zip(["x", "gate_up_proj", "down_proj"], grads, grads_ref, strict=True):
        assert_close(got, want, tol, f"grad {name}")
