"""``mixcompile demo``: build a small GPT, convert it to MoE and to MoT, and show what changed.

Everything is built here (no downloads) and runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixcompile.compiler import convert_with_report, inspect
from mixcompile.models.tiny_gpt import build_tiny_gpt
from mixcompile.runtime.introspect import aux_loss, stats

DEMO_CONFIG = {"d_model": 64, "n_layer": 4, "n_head": 4, "d_ff": 256, "max_seq": 64}


def run_demo() -> None:
    torch.manual_seed(0)
    model = build_tiny_gpt(**DEMO_CONFIG)
    tokens = torch.randint(0, 256, (8, 32))
    print("== the dense model: what mixcompile finds ==")
    print(inspect(model, strategy="moe", num_experts=4, top_k=2))

    print("\n== MoE: 4 experts, top-2, upcycled (every expert a copy of the dense FFN) ==")
    moe, report = convert_with_report(
        model, strategy="moe", num_experts=4, top_k=2, init="upcycle", example_inputs=(tokens,)
    )
    print(report)
    with torch.no_grad():
        error = (moe(tokens) - model(tokens)).abs().max().item()
    print(f"max |MoE - dense| on a batch: {error:.2e}  (upcycling preserves the function at step 0)")
    print(f"still a {type(moe).__name__}; greedy continuation:", moe.generate(tokens[:1, :4], 4)[0].tolist())

    print("\n== MoT: flop-matched, groups of 4 sequences, 8 experts, in the last half of the layers ==")
    mot, report = convert_with_report(
        model, strategy="mot", num_experts=8, group_size=4, sizing="flop", init="random", sites="last_half"
    )
    print(report)
    print("\n== what inspect says about the converted MoT model ==")
    print(inspect(mot))

    print("\n== one training step each ==")
    for name, candidate in (("dense", model), ("moe", moe), ("mot", mot)):
        candidate.train()
        logits = candidate(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        (loss + aux_loss(candidate)).backward()
        params = sum(p.numel() for p in candidate.parameters())
        print(f"{name:<6} params {params:>9,}  loss {loss.item():.3f}  aux {aux_loss(candidate).item():.4f}")
    first = next(iter(stats(moe).items()))
    print(
        f"routing of {first[0]}: expert load {first[1]['expert_load'].tolist()}, "
        f"entropy {first[1]['routing_entropy']:.3f}"
    )
