"""Convert a Hugging Face LLaMA into a Mixture-of-Experts model, and show that nothing else changed.

The model is built from a tiny ``LlamaConfig`` (random weights, nothing downloaded). Upcycled experts with a
top-k router compute exactly the dense FFN, so the converted model has the original's logits and greedy
generations; it is still a ``LlamaForCausalLM``, so ``.generate()`` works unchanged. It is then saved with
``mixcompile.save`` (safetensors plus a manifest, no pickle) and loaded back with ``mixcompile.load``. Last,
a Mixture-of-Tokens conversion runs forward (it mixes tokens across sequences, so its logits differ).

    python examples/hf_convert.py                 # a few seconds on a CPU
    python examples/hf_convert.py --out llama-moe # keep the saved model
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixcompile

MOE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "router": "topk", "init": "upcycle"}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def check_same(what: str, expected: torch.Tensor, got: torch.Tensor, atol: float = 1e-5) -> None:
    """Exit with an error unless the tensors match (an assert would vanish under ``python -O``)."""
    error = (expected.double() - got.double()).abs().max().item() if expected.shape == got.shape else math.inf
    print(f"{what}: {'equal' if error <= atol else 'DIFFERENT'} (max |difference| {error:.1e})")
    if error > atol:
        raise SystemExit(f"{what} differ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, help="where to save the converted model (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new folder")

    model = tiny_llama()
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    print(mixcompile.inspect(model, **MOE))

    moe = mixcompile.convert(model, **MOE).eval()  # a converted copy; `model` stays dense
    block = type(moe.model.layers[0].mlp).__name__
    print(f"\nconverted: still a {type(moe).__name__}; model.layers[0].mlp is now a {block}")
    check_same("logits, dense vs MoE", logits(model, ids), logits(moe, ids))
    prompt = ids[:, :4]
    dense_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    moe_tokens = moe.generate(prompt, max_new_tokens=8, do_sample=False)
    print(f"greedy continuation, dense: {dense_tokens[0, 4:].tolist()}")
    print(f"greedy continuation, MoE:   {moe_tokens[0, 4:].tolist()}")
    check_same("generated tokens, dense vs MoE", dense_tokens, moe_tokens)

    with tempfile.TemporaryDirectory() as scratch:
        path = args.out or Path(scratch) / "llama-moe"
        mixcompile.save(moe, path)  # refuses to replace an existing folder
        loaded = mixcompile.load(path).eval()
        print(f"\nsaved to and loaded from {path}: {sorted(p.name for p in path.iterdir())}")
    check_same("logits, saved vs loaded", logits(moe, ids), logits(loaded, ids))

    mot = mixcompile.convert(model, strategy="mot", num_experts=4, group_size=2).eval()
    out = logits(mot, ids)
    finite = out.isfinite().all().item()
    print(f"\nMoT (groups of 2 sequences) runs forward: logits {tuple(out.shape)}, all finite: {finite}")


if __name__ == "__main__":
    main()
