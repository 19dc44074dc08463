"""Train a dense GPT, its MoE conversion and its MoT conversion on real text, and compare them.

The three models have equal FFN FLOPs per token: the MoE and MoT FFNs are flop-matched to the dense one
(MoT only in the later half of the layers, as in Antoniak et al. 2023). Text is byte-level, so no
tokenizer is downloaded; by default it is the Python standard library's own source, present on every
machine. Files are split into training and held-out validation text before anything is trained.

    python examples/train_lm.py                   # CPU demo, about half a minute on 2 cores
    python examples/train_lm.py --preset gpu      # one GPU, long enough for the curves to separate
    python examples/train_lm.py --data my_corpus/ # any text file or folder

Writes ``runs/train_lm/log.csv`` and ``runs/train_lm/curves.png`` and prints a results table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import math
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mixcompile
from mixcompile import TinyGPT


@dataclass(frozen=True)
class Config:
    """Model and training sizes; the defaults are the CPU preset."""

    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 256
    seq: int = 64
    batch: int = 16
    steps: int = 150
    eval_every: int = 25
    lr: float = 3e-3
    experts: int = 8
    top_k: int = 2
    group_size: int = 4


PRESETS = {
    "cpu": Config(),
    "gpu": Config(
        d_model=512,
        n_layer=8,
        n_head=8,
        d_ff=2048,
        seq=256,
        batch=64,
        steps=4000,
        eval_every=200,
        lr=1e-3,
        experts=32,
        group_size=16,
    ),
}


CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor


def load_corpus(source: Path | None, val_fraction: float = 0.05) -> Corpus:
    """Bytes of every text file; whole files go to validation by a stable hash of their name."""
    if source is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"))
    elif source.is_file():
        root, files = source, [source]
    else:
        root, files = source, sorted(p for p in source.rglob("*") if p.is_file() and _is_text(p))
    train, val = bytearray(), bytearray()
    for path in files:
        data = path.read_bytes()
        held_out = zlib.crc32(str(path.relative_to(root.parent)).encode()) % 1000 < val_fraction * 1000
        (val if held_out else train).extend(data)
    if len(files) == 1:  # one file: hold out its tail instead
        data = train + val
        cut = int(len(data) * (1 - val_fraction))
        train, val = data[:cut], data[cut:]
    if not train or not val:
        raise SystemExit(f"not enough text under {root} to split into training and validation.")
    return Corpus(torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8))


def _is_text(path: Path) -> bool:
    try:
        path.read_bytes()[:4096].decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def batch_of(
    data: torch.Tensor, batch: int, seq: int, generator: torch.Generator, device: str
) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long().to(device)


def build_dense(cfg: Config) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(
        d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, d_ff=cfg.d_ff, max_seq=cfg.seq
    )


def build_models(cfg: Config) -> dict[str, torch.nn.Module]:
    """On the CPU: each model goes to the device only while it trains, so each peak counts one model."""
    dense = build_dense(cfg)
    moe = mixcompile.convert(
        copy.deepcopy(dense),
        strategy="moe",
        num_experts=cfg.experts,
        top_k=cfg.top_k,
        sizing="flop",
        init="random",
        verify=False,
    )
    mot = mixcompile.convert(
        copy.deepcopy(dense),
        strategy="mot",
        num_experts=cfg.experts,
        group_size=cfg.group_size,
        sizing="flop",
        init="random",
        sites="last_half",
        verify=False,
    )
    return {"dense": dense, "moe": moe, "mot": mot}


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, cfg: Config, device: str, batches: int = 8) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same held-out batches for every model
    losses = [
        _loss(model, batch_of(corpus.val, cfg.batch, cfg.seq, generator, device)).item()
        for _ in range(batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def _loss(model: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy; on a GPU under bfloat16 autocast, as models are trained there (all three
    models alike: the dense linears and the sparse blocks' kernels then all compute in bfloat16)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=chunk.is_cuda):
        logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1))


def train(
    name: str, model: torch.nn.Module, corpus: Corpus, cfg: Config, device: str, log: csv.writer
) -> dict:
    """Train for ``cfg.steps`` steps. The validation loss before training is kept apart from the curve (it
    would squash the plot), for comparing conversions at step 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    generator = torch.Generator().manual_seed(0)  # every model sees the same training batches
    reset_peak_memory(device)
    initial_val = evaluate(model, corpus, cfg, device)
    log.writerow([name, 0, "", f"{initial_val:.4f}", "0.00"])
    curve, elapsed = [], 0.0
    for step in tqdm(range(1, cfg.steps + 1), desc=name, disable=None):
        chunk = batch_of(corpus.train, cfg.batch, cfg.seq, generator, device)
        started = time.perf_counter()
        loss = _loss(model, chunk)
        (loss + mixcompile.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        mixcompile.update_routing_bias(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step > 1:  # step 1 pays one-off costs (thread pools, kernel compilation), not training speed
            elapsed += time.perf_counter() - started
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate(model, corpus, cfg, device)
            curve.append((step, elapsed, val))
            log.writerow([name, step, f"{loss.item():.4f}", f"{val:.4f}", f"{elapsed:.2f}"])
    timed_tokens = (cfg.steps - 1) * cfg.batch * cfg.seq
    return {
        "initial_val": initial_val,
        "curve": curve,
        "tokens_per_s": timed_tokens / elapsed if elapsed else math.nan,
        "peak_bytes": peak_memory(device),
        "params": sum(p.numel() for p in model.parameters()),
    }


def reset_peak_memory(device: str) -> None:
    """Start a fresh peak for the next model (on Linux CPUs by resetting the resident-set high-water mark)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")


def peak_memory(device: str) -> int | None:
    """Peak bytes since :func:`reset_peak_memory`: allocated CUDA memory, or on CPU the process's resident set
    (the Python runtime and all three models included). ``None`` where it cannot be read (Windows)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    if PROC_STATUS.exists():
        lines = PROC_STATUS.read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def steps_to_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    return next((step for step, _, val in curve if val <= target), None)


def print_table(results: dict[str, dict], device: str) -> None:
    target = results["dense"]["curve"][-1][2]
    print(
        f"\n{'model':<6} {'params':>10} {'final val':>10} {'steps to dense final':>21} {'tokens/s':>10} "
        f"{'peak MiB':>9}"
    )
    for name, r in results.items():
        reach = steps_to_reach(r["curve"], target) or "not reached"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        print(
            f"{name:<6} {r['params']:>10,} {r['curve'][-1][2]:>10.4f} {reach:>21} "
            f"{r['tokens_per_s']:>10,.0f} {peak:>9}"
        )
    if not device.startswith("cuda"):
        print("(peak MiB on CPU: the whole process's resident set while that model trained)")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results.items():
        steps, seconds, vals = zip(*result["curve"], strict=True)
        by_step.plot(steps, vals, label=name, marker=".")
        by_time.plot(seconds, vals, label=name, marker=".")
    by_step.set(xlabel="training step", ylabel="validation loss (nats/byte)", title="loss vs steps")
    by_time.set(xlabel="training time (s)", ylabel="validation loss (nats/byte)", title="loss vs wall-clock")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", type=Path, help="a text file or folder (default: the stdlib's .py files)")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--eval-every", type=int, help="override the preset's evaluation interval")
    parser.add_argument("--out", type=Path, default=Path("runs/train_lm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps, "eval_every": args.eval_every}
    cfg = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.steps < 1 or cfg.eval_every < 1:
        parser.error("--steps and --eval-every must be positive")
    if args.data is not None and not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    corpus = load_corpus(args.data)
    print(
        f"text: {len(corpus.train):,} training bytes, {len(corpus.val):,} held-out bytes; "
        f"device {args.device}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open(args.out / "log.csv", "w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["model", "step", "train_loss", "val_loss", "seconds"])
        for name, model in build_models(cfg).items():
            results[name] = train(name, model.to(args.device), corpus, cfg, args.device, log)
            model.cpu()
    plot(results, args.out / "curves.png")
    print_table(results, args.device)
    print(f"\nwrote {args.out / 'log.csv'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
