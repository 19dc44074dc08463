"""What a conversion costs next to writing its result once: time against a deepcopy of the converted model,
peak memory against the dense and converted models held together.

    python benchmarks/bench_convert.py            # 8-layer d=1024 LLaMA -> 8 upcycled experts (the target)
    python benchmarks/bench_convert.py --smoke    # a tiny LLaMA, seconds

Each measurement runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own.
Targets: time ratio <= 1.5, memory ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

MEASURE = """
import copy, json, resource, sys, time
import torch, transformers
import mixcompile as mc

config = transformers.LlamaConfig(**json.loads(sys.argv[1]))
experts, what = int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
dense = transformers.LlamaForCausalLM(config).eval()
def mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
before = mib()
start = time.perf_counter()
converted = mc.convert(dense, strategy="moe", num_experts=experts, top_k=2)
seconds = time.perf_counter() - start
if what == "copy":
    start = time.perf_counter()
    copy.deepcopy(converted)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": mib(), "before_mib": before,
                  "dense_mib": nbytes(dense) / 2**20, "converted_mib": nbytes(converted) / 2**20}))
"""


def measure(config: dict, experts: int, what: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), json.dumps(config), str(experts), what],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA")
    args = parser.parse_args()
    if args.smoke:
        config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "vocab_size": 256}
        experts = 4
    else:
        config = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "vocab_size": 32000}
        experts = 8
    config |= {"num_attention_heads": 8, "num_key_value_heads": 8}
    convert = measure(config, experts, "convert")
    copy = measure(config, experts, "copy")
    time_ratio = convert["seconds"] / copy["seconds"]
    # Dense model in memory plus what the conversion added at its peak, against both models held together.
    held = convert["dense_mib"] + convert["converted_mib"]
    peak = convert["peak_mib"] - convert["before_mib"] + convert["dense_mib"]
    note = ", for the full-size run: fixed costs dominate at smoke size" if args.smoke else ""
    print(
        f"LLaMA {config['num_hidden_layers']} layers, d={config['hidden_size']}, "
        f"h={config['intermediate_size']} -> {experts} upcycled experts\n"
        f"convert {convert['seconds']:.2f} s, deepcopy of the converted model {copy['seconds']:.2f} s: "
        f"time ratio {time_ratio:.2f} (target <= 1.5{note})\n"
        f"dense {convert['dense_mib']:.0f} MiB + converted {convert['converted_mib']:.0f} MiB = "
        f"{held:.0f} MiB; peak {peak:.0f} MiB: memory ratio {peak / held:.2f} (target <= 1.3{note})"
    )


if __name__ == "__main__":
    main()
