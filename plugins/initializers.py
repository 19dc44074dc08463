"""Built-in initializers: fill stacked experts from a dense FFN (or from scratch).

Each receives the :class:`~mixcompile.StackedExperts` to fill (in place, under ``no_grad``) and the
canonical :class:`~mixcompile.DenseFFN` view, whatever the FFN looked like in the model.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

import torch

from mixcompile import (
    ConfigError,
    DenseFFN,
    InitializerRegister,
    StackedExperts,
    check_choice,
    check_number,
    hookimpl,
)

SplitMethod: TypeAlias = Literal["random", "balanced"]
SPLIT_METHODS: tuple[SplitMethod, ...] = get_args(SplitMethod)


def _need_dense(name: str, dense: DenseFFN | None) -> DenseFFN:
    if dense is None:
        raise ConfigError(
            f"initializer {name!r} copies a dense FFN, but none was given; use 'random' instead."
        )
    return dense


def _copy(param: torch.Tensor | None, value: torch.Tensor | None) -> None:
    if param is None:
        return
    if value is None:
        param.zero_()
    else:
        param.copy_(value.to(param.dtype))


def upcycle(
    experts: StackedExperts,
    dense: DenseFFN | None,
    *,
    generator: torch.Generator | None = None,
    noise: float = 0.0,
) -> None:
    """Sparse upcycling (Komatsuzaki 2022): every expert is a copy of the dense FFN.

    With combine weights summing to 1 per token and no drops, the block computes the dense function.
    ``noise`` adds Gaussian noise of ``noise * std(w)`` to each copy to break the experts' symmetry.
    """
    dense = _need_dense("upcycle", dense)
    if experts.d_hidden != dense.d_hidden:
        e, h = experts.num_experts, dense.d_hidden
        fill = "init='split' or init='random'" if e * experts.d_hidden == h else "init='random'"
        raise ConfigError(
            f"upcycle copies the dense FFN, so the expert hidden size ({experts.d_hidden}) must equal "
            f"the dense one ({h}); for experts of {experts.d_hidden}, use {fill}."
        )
    check_number("noise", noise, minimum=0)
    for param, value in zip(experts.tensors, dense.tensors, strict=True):
        if param is None:
            continue  # a weight the experts lack, and so does the dense FFN (load_dense checks they fit)
        _copy(param, None if value is None else value.unsqueeze(0).expand_as(param))
        if value is not None and noise > 0 and value.ndim == 2:
            scale = noise * value.float().std()
            param.add_((torch.randn(param.shape, generator=generator) * scale).to(param))


def split(
    experts: StackedExperts,
    dense: DenseFFN | None,
    *,
    generator: torch.Generator | None = None,
    method: SplitMethod = "random",
    scale: float = 1.0,
) -> None:
    """Neuron splitting (MoEfication, LLaMA-MoE): partition the h hidden neurons into E experts of h / E.

    The sum of all experts equals the dense FFN (each expert carries ``b_out / E``); ``scale`` multiplies
    the experts' outputs, e.g. ``scale=E`` to compensate a router that gives every expert weight 1/E.
    ``method="balanced"`` groups neurons whose input weights are similar (balanced k-means).
    """
    dense = _need_dense("split", dense)
    e, h = experts.num_experts, dense.d_hidden
    if e * experts.d_hidden != h:
        raise ConfigError(
            f"split partitions the dense hidden size {h} into {e} experts, so the expert hidden size must be "
            f"{h} / {e}; got {experts.d_hidden}." + ("" if h % e == 0 else f" {h} is not divisible by {e}.")
        )
    check_choice("method", method, SPLIT_METHODS)
    check_number("scale", scale)
    if method == "random":
        groups = torch.randperm(h, generator=generator).reshape(e, experts.d_hidden)
    else:
        rows = dense.w_in if dense.w_gate is None else torch.cat([dense.w_gate, dense.w_in], dim=1)
        groups = balanced_clusters(rows.float(), e, generator=generator)
    groups = groups.to(dense.w_in.device)
    _copy(experts.w_in, dense.w_in[groups])
    _copy(experts.w_gate, None if dense.w_gate is None else dense.w_gate[groups])
    _copy(experts.b_in, None if dense.b_in is None else dense.b_in[groups])
    _copy(experts.b_gate, None if dense.b_gate is None else dense.b_gate[groups])
    _copy(experts.w_out, dense.w_out[:, groups].permute(1, 0, 2) * scale)
    if experts.b_out is not None:
        b_out = torch.zeros(dense.d_model) if dense.b_out is None else dense.b_out
        _copy(experts.b_out, (b_out * scale / e).unsqueeze(0).expand(e, -1))


def balanced_clusters(
    rows: torch.Tensor, num_clusters: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Balanced k-means, ten rounds: ``[num_clusters, n / num_clusters]`` row indices, similar rows together.

    Each round assigns (row, centroid) pairs greedily from the closest, skipping full clusters, so every
    cluster ends with exactly ``n / num_clusters`` rows.
    """
    n = rows.shape[0]
    size = n // num_clusters
    rows = torch.nn.functional.normalize(rows, dim=1)
    centroids = rows[torch.randperm(n, generator=generator)[:num_clusters]]
    for _ in range(10):
        distances = torch.cdist(rows, centroids)  # [n, C]
        fill = [0] * num_clusters
        chosen = [-1] * n
        assigned = 0
        for flat in torch.argsort(distances.reshape(-1)).tolist():
            row, cluster = divmod(flat, num_clusters)
            if chosen[row] >= 0 or fill[cluster] == size:
                continue
            chosen[row] = cluster
            fill[cluster] += 1
            assigned += 1
            if assigned == n:
                break
        assignment = torch.tensor(chosen)
        centroids = torch.stack([rows[assignment == c].mean(0) for c in range(num_clusters)])
    return torch.stack([torch.nonzero(assignment == c).squeeze(1) for c in range(num_clusters)])


def random_init(
    experts: StackedExperts, dense: DenseFFN | None, *, generator: torch.Generator | None = None
) -> None:
    """Fresh ``nn.Linear``-style init for training from scratch; the dense FFN, if any, is ignored."""
    experts.reset_parameters(generator)


@hookimpl
def register_initializers(register: InitializerRegister) -> None:
    register("upcycle", upcycle, description="copy the dense FFN into every expert (optional noise)")
    register("split", split, description="partition the hidden neurons into experts (random or balanced)")
    register("random", random_init, description="fresh init, for training from scratch")
