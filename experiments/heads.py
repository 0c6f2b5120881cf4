"""Experiment (d): 4 against 8 attention heads at equal tokens (K2 report sec. 2.3).

`tiny` (4 heads, 32 experts) against `tiny` with 8 heads, every per-head dimension kept
(`--set num_attention_heads=8 --set num_key_value_heads=8`: MLA needs both), trained like the runs
of experiment (c) and scored on the same fixed validation batches. The 4-head runs are experiment
(c)'s 32-expert runs (runs/sparsity/e32-s<seed>, trained here if missing). The compute side comes
from kimik2.heads_cost, printed for the pair here and for K2's 64 -> 128 heads.

    python experiments/heads.py --seeds 0 1 2 --jobs 2 --plot assets/exp-d-heads.png
    python experiments/heads.py --costs          # the compute side alone, no training

Each 8-head run is

    python train.py --set num_attention_heads=8 --set num_key_value_heads=8 --seed S --max-steps 200 \\
        --eval-interval 25 --ckpt-interval 200 --keep-ckpts 1 --sample-tokens 0 --out runs/heads/h8-sS
"""
import argparse
import os

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
import sparsity
from data import number
from kimik2 import Config, flops_per_token, heads_cost


def print_costs():
    """The compute side, from kimik2.py's calculators alone: training FLOPs per token of the pair
    (mean over a 128-token sequence, as summarize.py counts them) and heads_cost."""
    tiny, k2 = Config.from_preset("tiny"), Config.from_preset("kimi-k2")
    wide = Config(**{**vars(tiny), "num_attention_heads": 8, "num_key_value_heads": 8})
    four, eight = (flops_per_token(c, (128 + 1) / 2, training=True) for c in (tiny, wide))
    print(f"training FLOPs/token at 128-token sequences: 4 heads {four / 1e6:.2f}M, 8 heads {eight / 1e6:.2f}M "
          f"({100 * (eight / four - 1):+.0f}%)")
    for context in (128, 4096, 131072):
        print(f"tiny 4 -> 8 heads at {context} tokens: {heads_cost(tiny, 8, context)}")
    for context in (4096, 131072):
        print(f"Kimi-K2 64 -> 128 heads at {context} tokens: {heads_cost(k2, 128, context)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=number(int, 1), default=1, help="runs at a time (with OMP_NUM_THREADS=1 each)")
    p.add_argument("--out", default="runs/heads")
    p.add_argument("--sparsity-out", default="runs/sparsity", help="where experiment (c)'s runs are")
    p.add_argument("--plot", help="PNG (needs matplotlib)")
    p.add_argument("--costs", action="store_true", help="print the compute side only (no training, seconds)")
    args = p.parse_args(argv)
    if args.costs:
        print_costs()
        return 0
    sweep = {**sparsity.runs(args.sparsity_out, [32], args.seeds),
             **{os.path.join(args.out, f"h8-s{s}"): ["--set", "num_attention_heads=8", "--set", "num_key_value_heads=8",
                                                    "--seed", str(s), *summarize.SWEEP] for s in args.seeds}}
    summarize.sweep(sweep, args.jobs, args.plot)
    print_costs()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
