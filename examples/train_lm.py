"""Train a dense GPT, its MoE conversion and its MoT conversion on real text, compare them, then measure MoT
inference with fewer sequences than a group and after transition tuning.

    python examples/train_lm.py                        # CPU smoke run, about 35 s at one thread
    python examples/train_lm.py --preset cpu-long      # CPU, about 17 CPU-minutes: an ordering shows
    python examples/train_lm.py --preset gpu --out DIR # H200 7.4 min, H100 over 8.75: the paper's setup
    python examples/train_lm.py --set steps=20 --set d_model=32 ...   # override any Config field

Writes under ``--out``: ``log.csv`` (validation loss at regular steps, every phase, with each phase's
training FLOPs per token relative to dense's, ``flops_vs_dense``: a phase's compute up to ``step`` is ``step x
flops_vs_dense`` dense steps, counted from the phase's start), ``curves.png`` (validation loss against steps,
against training compute and against wall-clock time), ``small_batch.csv`` and ``summary.txt`` (the two
printed tables).

**FLOPs per token.** ``sizing="flop"`` makes the *experts'* FLOPs per token equal the dense FFN's; each MoT
layer also spends ``3 * E * d`` multiply-adds per token on its controller, mixing and redistribution (a MoE
layer ``E * d`` on its router), so the sparse models train at more FLOPs per token than dense: 1.027x (MoT)
and 1.009x (MoE) on the smoke preset, 1.214x and 1.071x on ``cpu-long`` (64 experts for a d_ff of 256: the MoT
mixing is 1.5 * E / d_ff = 37.5% of the dense FFN's multiply-adds), 1.030x and 1.010x on ``gpu``. The results
table prints that ratio ("vs dense") and, besides the step at which each model first reaches dense's final
loss, the training compute spent by then: that step times the ratio, in dense steps (dense's own run is 100%;
above 100%, dense reached that loss with less compute).

**What the paper did** (Antoniak et al. 2023, "Mixture of Tokens: Continuous MoE through Cross-Example
Aggregation", arXiv 2310.15961; read in the authors' post "Mixture of Tokens" of 2023-10-06 on
llm-random.github.io, their configs in github.com/llm-random/llm-random, ``configs/baselines/common.yaml``
and ``configs/baselines/gpt/mot/mini.yaml``, and the v2 paper's figures and tables as summarised in
deep-diver/neurips2024 ``posters/0zFVhMBZHJ``):

- GPT decoder on C4 with the GPT-2 tokenizer, mixed precision (bfloat16 compute, float32 weights);
  Transformer-Medium = 8 blocks, d_model 512, d_ff 2048, 8 heads (Base: 12 blocks, 768).
- *Every* feed-forward layer replaced by a MoT layer; group size 32 (tokens at one position in 32
  sequences); flop-matched experts: expert size ``d_ff * G / E`` (the post's model: 512 experts of 64 for
  d_ff 1024), so parameters grow ``G`` times (32x) while the experts' FLOPs per token stay the dense FFN's.
- 250K steps, batch 256 x 256 tokens, cosine schedule with warmup over the first 1% (2,500 steps) down to
  10% of the peak rate, gradient clipping 0.5; peak rate tuned per model (4e-3 dense, 2e-3 MoT).
- Claim: MoT reaches the dense model's final loss in about a third (v2) to a quarter (post) of the steps;
  the best v2 variant (``MoT-Base/64E/16``) lets each expert process several mixtures per group.
- Transition tuning (v2): after 150K MoT steps, switch to a Token Choice MoE initialised from the MoT
  weights and train 15K more steps (10%), so the model runs one sequence at a time.

**What this script does, and why it differs**:

- Text: the Python standard library's own sources (every ``.py`` under the stdlib, ``site-packages``
  excluded: ~30 MB, present on every machine, the GPU one included, which has no internet), byte-level
  (vocabulary 256) so no tokenizer is needed; whole files are held out for validation. C4 and the GPT-2
  tokenizer are not available offline.
- Same sizes as Transformer-Medium on the GPU (8 x 512, d_ff 2048, 8 heads), MoT G=32 in every layer with
  E=64 flop-matched experts of 1024 (32x the FFN parameters, the paper's scaling), and the MoE baseline with
  the same experts (64 of 1024, top-2: same parameters, same expert FLOPs per token; the totals differ by
  the MoT mixing and the MoE router, see above). E = 2G keeps the transition a top-2 router (a top-1 router
  with renormalised weights gets no gradient).
- Steps: about two thousand, not 250K, at batch 64 x 256 (the GPU call has 9 minutes for everything): the
  claim is tested at the start of training only. Every model sees the same windows of text in the same
  order (non-overlapping, shuffled once with a fixed seed). The stdlib's size varies: 30 MB here is about
  one pass of the GPU preset, the 10 MB of the GPU machine's Python 2.9 passes, so that run repeats text
  (the paper never repeats a token); the script prints the passes it made.
- Schedule: the paper's shape (1% warmup, cosine to 10%, clip 0.5); one peak rate for all models, not tuned
  per model (no budget for sweeps), AdamW with weight decay 0.1 (the paper's is not stated where we read).
- Not reproduced: the multiple-mixtures-per-expert variant (``/16``: the MoT block has one mixture per
  expert), the Base size, ReLU experts (TinyGPT's FFN uses GELU, kept for all models).
- Transition tuning: 10% more steps after the MoT run, as in v2 (:func:`mixcompile.to_token_choice`), and,
  for comparison, the same steps with the temperature annealed to 0.01 (the post's earlier proposal,
  :func:`mixcompile.temperature_schedule`). The small-batch table gives the held-out loss at batch G, at
  batch 1 with ``small_batch="group"`` and ``"sparse"``, and after each tuning.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mixcompile
from mixcompile import TinyGPT


@dataclass(frozen=True)
class Config:
    """Model and training sizes; the defaults are the CPU smoke preset. MoE and MoT use ``experts`` experts
    of the same flop-matched size when ``experts = top_k * group_size``."""

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
    mot_sites: str = "all"
    warmup: float = 0.1  # fraction of the steps (the paper: 0.01; longer for the 150-step smoke run)
    final_lr: float = 0.1  # fraction of the peak rate reached at the last step (the paper's)
    grad_clip: float = 0.5  # the paper's
    transition: float = 0.1  # transition-tuning steps, as a fraction of the steps (the paper's 15K / 150K)
    eval_batches: int = 8
    # Held-out batches for the small-batch table (its batch-1 rows run one sequence at a time, 64x the calls
    # of batch G on the GPU preset, so that preset uses fewer; every row of the table uses the same ones).
    small_batch_batches: int = 8


PRESETS = {
    "cpu": Config(),
    "cpu-long": Config(
        d_model=64,
        n_layer=4,
        n_head=4,
        d_ff=256,
        seq=64,
        batch=32,
        steps=2000,
        eval_every=100,
        lr=3e-3,
        experts=64,
        top_k=2,
        group_size=32,
        warmup=0.01,
    ),
    "gpu": Config(
        d_model=512,
        n_layer=8,
        n_head=8,
        d_ff=2048,
        seq=256,
        batch=64,
        steps=1800,
        eval_every=100,
        lr=1e-3,
        experts=64,
        top_k=2,
        group_size=32,
        warmup=0.01,
        small_batch_batches=2,
    ),
}


CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor


def load_corpus(source: Path | None, val_fraction: float = 0.05) -> Corpus:
    """Bytes of every text file; whole files go to validation by a stable hash of their name. The default
    is every ``.py`` file of the standard library (its ``site-packages`` left out: that is not the stdlib
    and differs between machines)."""
    if source is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
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


class Windows:
    """Non-overlapping windows of ``seq + 1`` bytes in one order fixed by ``seed``: batch ``i`` is windows
    ``i*B .. (i+1)*B - 1`` of that order (wrapping round after a full pass), so every model trained from
    batch 0 sees the same text in the same order, and a phase started at batch ``s`` sees new text."""

    def __init__(self, data: torch.Tensor, seq: int, seed: int) -> None:
        if len(data) < seq + 1:
            raise SystemExit(f"{len(data):,} bytes of text is shorter than one sequence of {seq + 1}.")
        self.windows = data.unfold(0, seq + 1, seq)  # [W, seq + 1], a view
        self.order = torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(seed))

    def batch(self, index: int, size: int, device: str) -> torch.Tensor:
        picks = self.order[(index * size + torch.arange(size)) % len(self.order)]
        return self.windows[picks].long().to(device)

    def passes(self, batches: int, size: int) -> float:
        return batches * size / len(self.order)


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
        sites=cfg.mot_sites,
        verify=False,
    )
    return {"dense": dense, "mot": mot, "moe": moe}


def train_flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """Training FLOPs per token, ``6 x`` the forward multiply-adds (forward 1x, backward 2x): the matmuls of
    attention, FFNs or their experts (only those a token uses), the MoT mixing (controller, merge and emit,
    ``E * d`` each), the MoE router (``E * d``) and the output layer; the causal attention itself averages
    ``seq * d`` per layer. Flop sizing equalises the experts' share only, so the mixing and routers make the
    sparse models' total larger than dense's (see the module docstring)."""
    d, macs = cfg.d_model, cfg.d_model * 256 + cfg.n_layer * (4 * cfg.d_model**2 + cfg.seq * cfg.d_model)
    blocks = mixcompile.sparse_blocks(model)
    for block in blocks.values():
        e = block.experts
        if isinstance(block, mixcompile.MoTBlock):
            macs += 2 * d * e.d_hidden * e.num_experts / block.group_size + 3 * e.num_experts * d
        else:
            macs += 2 * d * e.d_hidden * block.top_k + e.num_experts * d
    macs += (cfg.n_layer - len(blocks)) * 2 * d * cfg.d_ff
    return 6.0 * macs


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, batch: int, device: str) -> float:
    """Mean next-byte loss over the held-out windows ``val``, fed ``batch`` sequences at a time."""
    model.eval()
    losses = [_loss(model, val[i : i + batch].to(device)).item() for i in range(0, len(val), batch)]
    model.train()
    return sum(losses) / len(losses)


def _loss(model: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy; on a GPU under bfloat16 autocast, as models are trained there (all three
    models alike: the dense linears and the sparse blocks' kernels then all compute in bfloat16)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=chunk.is_cuda):
        logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1))


def held_out(corpus: Corpus, cfg: Config, batches: int | None = None) -> torch.Tensor:
    """The same held-out windows for every model and every evaluation: the first ``batches`` batches of them
    (default ``eval_batches``)."""
    windows = Windows(corpus.val, cfg.seq, seed=1234)
    return windows.batch(0, (batches or cfg.eval_batches) * cfg.batch, "cpu")


def lr_schedule(cfg: Config) -> Callable[[int], float]:
    """The paper's shape: linear warmup over ``warmup`` of the steps, cosine down to ``final_lr``."""
    warmup = max(1, round(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(
    name: str,
    model: torch.nn.Module,
    corpus: Corpus,
    cfg: Config,
    device: str,
    log: csv.writer,
    *,
    first_batch: int = 0,
    before_step: Callable[[int], None] | None = None,
    flops_vs_dense: float | None = None,
) -> dict:
    """Train for ``cfg.steps`` steps on batches ``first_batch ..`` of the shared order, with the paper's
    schedule (``before_step(step)`` runs before each). The validation loss before training is kept apart
    from the curve (it would squash the plot). ``flops_vs_dense`` (the model's training FLOPs per token over
    dense's), when given, is only recorded: a last column of each row of the log."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    windows, val = Windows(corpus.train, cfg.seq, seed=0), held_out(corpus, cfg)
    reset_peak_memory(device)
    initial_val = evaluate(model, val, cfg.batch, device)
    ratio = [] if flops_vs_dense is None else [f"{flops_vs_dense:.4f}"]
    log.writerow([name, 0, "", f"{initial_val:.4f}", "0.00", *ratio])
    curve, elapsed = [], 0.0
    for step in tqdm(range(1, cfg.steps + 1), desc=name, disable=None):
        chunk = windows.batch(first_batch + step - 1, cfg.batch, device)
        if before_step is not None:
            before_step(step - 1)
        started = time.perf_counter()
        loss = _loss(model, chunk)
        (loss + mixcompile.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        mixcompile.update_routing_bias(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step > 1:  # step 1 pays one-off costs (thread pools, kernel compilation), not training speed
            elapsed += time.perf_counter() - started
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val, cfg.batch, device)
            curve.append((step, elapsed, val_loss))
            log.writerow([name, step, f"{loss.item():.4f}", f"{val_loss:.4f}", f"{elapsed:.2f}", *ratio])
    timed_tokens = (cfg.steps - 1) * cfg.batch * cfg.seq
    return {
        "initial_val": initial_val,
        "curve": curve,
        "tokens_per_s": timed_tokens / elapsed if elapsed else math.nan,
        "peak_bytes": peak_memory(device),
        "params": sum(p.numel() for p in model.parameters()),
        "passes": windows.passes(first_batch + cfg.steps, cfg.batch),
    }


def reset_peak_memory(device: str) -> None:
    """Start a fresh peak for the next model (on Linux CPUs by resetting the resident-set high-water mark)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")


def peak_memory(device: str) -> int | None:
    """Peak bytes since :func:`reset_peak_memory`: allocated CUDA memory, or on CPU the process's resident set
    (the Python runtime and all models included). ``None`` where it cannot be read (Windows)."""
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


def first_reaching(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """The first evaluated (step, seconds) at which the validation loss is at or below ``target``."""
    return next(((step, seconds) for step, seconds, val in curve if val <= target), None)


def compute_to_reach(step: int | None, flops_vs_dense: float, cfg: Config) -> str:
    """The training compute of ``step`` steps of a model at ``flops_vs_dense`` times dense's FLOPs per token
    (every model trains on the same tokens per step), in dense steps and as a share of dense's run."""
    if step is None:
        return "not reached"
    dense_steps = step * flops_vs_dense
    return f"{dense_steps:,.0f} ({dense_steps / cfg.steps:.0%})"


def results_table(results: dict[str, dict], cfg: Config, device: str) -> str:
    target, dense_flops = results["dense"]["curve"][-1][2], results["dense"]["flops"]
    head = (
        f"{'model':<6} {'params':>11} {'GFLOP/tok':>9} {'vs dense':>8} {'final val':>9} "
        f"{'reaches dense final at':>26} {'compute to reach it':>19} {'tokens/s':>10} {'peak MiB':>9}"
    )
    lines = [head]
    for name, r in results.items():
        hit = first_reaching(r["curve"], target)
        reach = "not reached" if hit is None else f"step {hit[0]} ({hit[0] / cfg.steps:.0%}), {hit[1]:.0f} s"
        ratio = r["flops"] / dense_flops
        compute = compute_to_reach(None if hit is None else hit[0], ratio, cfg)
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        lines.append(
            f"{name:<6} {r['params']:>11,} {r['flops'] / 1e9:>9.3f} {ratio:>7.3f}x {r['curve'][-1][2]:>9.4f} "
            f"{reach:>26} {compute:>19} {r['tokens_per_s']:>10,.0f} {peak:>9}"
        )
    lines.append(
        f"(validation every {cfg.eval_every} steps, so a step is known to within {cfg.eval_every}; seconds "
        f"are training time to that evaluation; {results['dense']['passes']:.2f} passes over the text)"
    )
    lines.append(
        "(vs dense: training FLOPs per token over dense's, MoT mixing and routers included; compute to reach "
        "it: the equal-compute view, that step x vs dense, in dense steps and as a share of dense's run; "
        "over 100%: dense reached its final loss with less compute)"
    )
    if not device.startswith("cuda"):
        lines.append("(peak MiB on CPU: the whole process's resident set while that model trained)")
    return "\n".join(lines)


@torch.no_grad()
def small_batch_rows(model: torch.nn.Module, val: torch.Tensor, cfg: Config, device: str) -> list[tuple]:
    """The MoT model's held-out loss at batch G and at batch 1 under each ``small_batch`` policy, and at
    batch G with every block in sparse mode (each expert keeps its top member: no mixing)."""
    blocks = [b for b in mixcompile.sparse_blocks(model).values() if isinstance(b, mixcompile.MoTBlock)]
    rows = [("batch G, soft (as trained)", cfg.batch, evaluate(model, val, cfg.batch, device))]
    for policy in ("group", "sparse"):
        for block in blocks:
            block.small_batch = policy
        rows.append((f'batch 1, small_batch="{policy}"', 1, evaluate(model, val, 1, device)))
    for block in blocks:
        block.small_batch, block.mode = "group", "sparse"
    rows.append(('batch G, mode="sparse" (no mixing)', cfg.batch, evaluate(model, val, cfg.batch, device)))
    for block in blocks:
        block.mode = "soft"
    return rows


def transition_phases(
    mot: torch.nn.Module, corpus: Corpus, cfg: Config, device: str, log: csv.writer, dense_flops: float
) -> list[tuple]:
    """Continue the trained MoT model for ``transition * steps`` steps on new text three ways: unchanged
    (the control: what the extra steps alone give), with the temperature annealed 1 -> 0.01, and as a Token
    Choice MoE (the paper's transition tuning). Each phase re-warms to the peak rate over 10% of its steps,
    then decays as before (the paper's rate here is not stated where we read; on ``cpu-long`` the Token
    Choice model held at the final rate stood at 2.39 after 100 steps, re-warmed at 1.62). ``dense_flops``:
    the dense model's training FLOPs per token, for the log's ``flops_vs_dense``."""
    steps = max(1, round(cfg.transition * cfg.steps))
    tune = dataclasses.replace(cfg, steps=steps, eval_every=max(1, min(cfg.eval_every, steps)), warmup=0.1)
    val = held_out(corpus, cfg, cfg.small_batch_batches)

    mot_ratio = train_flops_per_token(mot, cfg) / dense_flops
    control = copy.deepcopy(mot).to(device)
    train("mot-more", control, corpus, tune, device, log, first_batch=cfg.steps, flops_vs_dense=mot_ratio)
    rows = [
        (
            f"MoT trained on (+{steps} steps, control), batch G",
            cfg.batch,
            evaluate(control, val, cfg.batch, device),
        )
    ]
    control.cpu()

    annealed = copy.deepcopy(mot).to(device)

    def anneal(step: int) -> None:
        mixcompile.set_mot_temperature(annealed, mixcompile.temperature_schedule(step, steps, end=0.01))

    train(
        "mot-anneal",
        annealed,
        corpus,
        tune,
        device,
        log,
        first_batch=cfg.steps,
        before_step=anneal,
        flops_vs_dense=mot_ratio,
    )
    mixcompile.set_mot_temperature(annealed, 0.01)
    label = f"annealed to tau 0.01 (+{steps} steps)"
    rows += [
        (f"{label}, {what}", batch, loss)
        for what, batch, loss in small_batch_rows(annealed, val, cfg, device)
    ]
    annealed.cpu()

    chosen = copy.deepcopy(mot).to(device)
    mixcompile.to_token_choice(chosen)
    rows.append(("token choice, before tuning, batch 1", 1, evaluate(chosen, val, 1, device)))
    chosen_ratio = train_flops_per_token(chosen, cfg) / dense_flops
    train("mot-to-tc", chosen, corpus, tune, device, log, first_batch=cfg.steps, flops_vs_dense=chosen_ratio)
    label = f"token choice, tuned (+{steps} steps)"
    rows += [(f"{label}, batch {b}", b, evaluate(chosen, val, b, device)) for b in (1, cfg.batch)]
    chosen.cpu()
    return rows


class PhaseClock:
    """Wall-clock seconds of each phase of the script, evaluations, compilation and copies included (the
    results table counts training steps only): says where a run's time limit goes."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now

    def __str__(self) -> str:
        laps = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in self.phases.items())
        return f"(wall-clock by phase: {laps}; {self.last - self.started:.0f} s in all)"


def small_batch_table(rows: list[tuple], reference: float) -> str:
    width = max(len(what) for what, _, _ in rows)
    lines = [f"{'MoT, held-out loss':<{width}} {'batch':>5} {'loss':>8} {'vs batch G':>10}"]
    lines += [f"{what:<{width}} {b:>5} {loss:>8.4f} {loss - reference:>+10.4f}" for what, b, loss in rows]
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Against training compute too where every result has its FLOPs per token (examples/upcycle_finetune.py
    # plots with this function and counts none).
    with_compute = all("flops" in result for result in results.values())
    fig, axes = plt.subplots(1, 3 if with_compute else 2, figsize=(16 if with_compute else 11, 4))
    by_step, by_time = axes[0], axes[-1]
    for name, result in results.items():
        steps, seconds, vals = zip(*result["curve"], strict=True)
        by_step.plot(steps, vals, label=name, marker=".")
        by_time.plot(seconds, vals, label=name, marker=".")
        if with_compute:
            ratio = result["flops"] / results["dense"]["flops"]
            axes[1].plot([s * ratio for s in steps], vals, label=f"{name} ({ratio:.3f}x)", marker=".")
    by_step.set(xlabel="training step", ylabel="validation loss (nats/byte)", title="loss vs steps")
    if with_compute:
        axes[1].set(
            xlabel="training compute (dense steps: step x FLOPs per token vs dense)",
            ylabel="validation loss (nats/byte)",
            title="loss vs training compute",
        )
    by_time.set(xlabel="training time (s)", ylabel="validation loss (nats/byte)", title="loss vs wall-clock")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_overrides(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, object]:
    """``--set field=value`` pairs, each value read with its field's type."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            parser.error(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = type(getattr(Config(), key))
        try:
            overrides[key] = kind(raw)
        except ValueError:
            parser.error(f"--set {pair!r}: {raw!r} is not a {kind.__name__}")
    return overrides


def check_config(cfg: Config, parser: argparse.ArgumentParser) -> None:
    """Fail before any training on sizes that could only fail later."""
    counts = (
        "d_model", "n_layer", "n_head", "d_ff", "seq", "batch", "steps", "eval_every", "eval_batches",
        "small_batch_batches", "experts", "top_k", "group_size",
    )  # fmt: skip
    for name in counts:
        if getattr(cfg, name) < 1:
            parser.error(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        parser.error(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
    if cfg.batch % cfg.group_size:
        parser.error(f"batch={cfg.batch} must be a multiple of group_size={cfg.group_size} (full MoT groups)")
    if not 0 < cfg.transition <= 1 or not 0 <= cfg.warmup < 1 or not 0 <= cfg.final_lr <= 1:
        parser.error("transition must be in (0, 1], warmup in [0, 1), final_lr in [0, 1]")
    try:
        for strategy in ("moe", "mot"):
            mixcompile.flop_matched_hidden(
                strategy, cfg.d_ff, num_experts=cfg.experts, top_k=cfg.top_k, group_size=cfg.group_size
            )
        mixcompile.Recipe(strategy="mot", sites=cfg.mot_sites)  # the site selection, as convert reads it
    except mixcompile.ConfigError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", type=Path, help="a text file or folder (default: the stdlib's .py files)")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--eval-every", type=int, help="override the preset's evaluation interval")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field")
    parser.add_argument("--out", type=Path, default=Path("runs/train_lm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps, "eval_every": args.eval_every}
    overrides = {k: v for k, v in overrides.items() if v is not None} | parse_overrides(args.set, parser)
    cfg = dataclasses.replace(PRESETS[args.preset], **overrides)
    check_config(cfg, parser)
    if args.data is not None and not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    corpus = load_corpus(args.data)
    print(
        f"text: {len(corpus.train):,} training bytes, {len(corpus.val):,} held-out bytes; "
        f"device {args.device}\n{cfg}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    clock = PhaseClock()
    models = build_models(cfg)
    clock.lap("build")
    flops = {name: train_flops_per_token(model, cfg) for name, model in models.items()}
    tokens, tune_steps = cfg.batch * cfg.seq, max(1, round(cfg.transition * cfg.steps))
    total = tokens * (cfg.steps * sum(flops.values()) + 3 * tune_steps * flops["mot"])
    print(f"training compute: {total / 1e15:.3f} PFLOP (6 x forward multiply-adds; evaluations not counted)")
    ratios = ", ".join(f"{name} {flop / flops['dense']:.3f}x" for name, flop in flops.items())
    print(f"training FLOPs per token vs dense: {ratios} (flop sizing equalises the experts' share only)")
    results = {}
    # Line-buffered: a run cut short (a time limit) keeps every evaluation it made.
    with open(args.out / "log.csv", "w", newline="", buffering=1) as handle:
        log = csv.writer(handle)
        log.writerow(["model", "step", "train_loss", "val_loss", "seconds", "flops_vs_dense"])
        for name, model in models.items():
            ratio = flops[name] / flops["dense"]
            results[name] = train(
                name, model.to(args.device), corpus, cfg, args.device, log, flops_vs_dense=ratio
            )
            results[name]["flops"] = flops[name]
            if name != "mot":
                model.cpu()
            clock.lap(name)
        # The comparison first: a run cut short by a time limit still has its table and curves.
        plot(results, args.out / "curves.png")
        table = results_table(results, cfg, args.device)
        (args.out / "summary.txt").write_text(f"{cfg}\n\n{table}\n{clock}\n")
        print(f"\n{table}\n{clock}\n", flush=True)
        mot = models["mot"]
        rows = small_batch_rows(mot, held_out(corpus, cfg, cfg.small_batch_batches), cfg, args.device)
        clock.lap("small batch")
        rows += transition_phases(mot, corpus, cfg, args.device, log, flops["dense"])
        mot.cpu()
        clock.lap("transition")
    with open(args.out / "small_batch.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["evaluation", "batch", "val_loss"])
        writer.writerows((what, batch, f"{loss:.4f}") for what, batch, loss in rows)
    summary = f"{table}\n\n{small_batch_table(rows, rows[0][2])}\n{clock}"
    (args.out / "summary.txt").write_text(f"{cfg}\n\n{summary}\n")
    print(f"\n{summary}\n\nwrote log.csv, curves.png, small_batch.csv and summary.txt under {args.out}")


if __name__ == "__main__":
    main()
