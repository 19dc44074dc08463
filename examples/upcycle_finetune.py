"""Sparse upcycling: train a dense GPT, turn copies of it into MoE and MoT, and keep training all three.

Upcycling fills every expert with a copy of the trained dense FFN, so the MoE model starts exactly where the
dense one stopped (the top-k router's weights sum to 1 per token): the script checks that its validation loss
at step 0 equals the dense model's. The MoT model mixes tokens across a group of sequences, so it starts
above the dense loss and has to recover. The dense model keeps training too, for the same steps on the same
batches: the fair baseline for "is the extra capacity worth it".

    python examples/upcycle_finetune.py                 # CPU demo, about a minute
    python examples/upcycle_finetune.py --steps 2000 --pretrain-steps 4000 --device cuda

Writes ``log.csv`` and ``curves.png`` under ``--out`` and prints where each model starts and ends.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path

import torch
from train_lm import Config, build_dense, load_corpus, plot, train

import mixcompile

CONFIG = Config(lr=1e-3)  # train_lm's CPU sizes; after upcycling, a third of the pretraining rate
PRETRAIN_LR = 3e-3


def upcycle(dense: torch.nn.Module, cfg: Config) -> dict[str, torch.nn.Module]:
    """Copies of the trained dense model, its FFNs turned into experts that start as the dense FFN."""
    moe = mixcompile.convert(
        dense, strategy="moe", num_experts=cfg.experts, top_k=cfg.top_k, router="topk", init="upcycle"
    )
    mot = mixcompile.convert(
        dense, strategy="mot", num_experts=cfg.experts, group_size=cfg.group_size, init="upcycle"
    )
    return {"moe": moe, "mot": mot}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=CONFIG.steps, help="continued-training steps per model")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="dense training before upcycling")
    parser.add_argument("--out", type=Path, default=Path("runs/upcycle_finetune"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.pretrain_steps < 1:
        parser.error("--steps and --pretrain-steps must be positive")
    cfg = dataclasses.replace(CONFIG, steps=args.steps, eval_every=min(CONFIG.eval_every, args.steps))
    pretrain = dataclasses.replace(cfg, steps=args.pretrain_steps, lr=PRETRAIN_LR)
    corpus = load_corpus(None)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "log.csv", "w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["model", "step", "train_loss", "val_loss", "seconds"])
        dense = build_dense(cfg).to(args.device)
        train("pretrain", dense, corpus, pretrain, args.device, log)
        models = {"dense": dense, **upcycle(dense, cfg)}  # converted copies: dense itself is unchanged
        results = {name: train(name, model, corpus, cfg, args.device, log) for name, model in models.items()}
    plot(results, args.out / "curves.png")

    final = f"val at step {cfg.steps}"
    print(f"\n{'model':<6} {'params':>10} {'val at step 0':>14} {final:>16} {'tokens/s':>10}")
    for name, r in results.items():
        print(
            f"{name:<6} {r['params']:>10,} {r['initial_val']:>14.4f} {r['curve'][-1][2]:>16.4f} "
            f"{r['tokens_per_s']:>10,.0f}"
        )
    dense_start, moe_start = results["dense"]["initial_val"], results["moe"]["initial_val"]
    if not math.isclose(moe_start, dense_start, rel_tol=1e-5):  # an exit code, unlike assert under -O
        raise SystemExit(f"the upcycled MoE starts at {moe_start:.6f}, not at dense's {dense_start:.6f}")
    print(f"\nupcycled MoE at step 0 equals dense ({moe_start:.6f} vs {dense_start:.6f})")
    print(f"wrote {args.out / 'log.csv'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
