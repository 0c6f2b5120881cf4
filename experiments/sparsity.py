"""Experiment (c): more experts at the same activated parameters (K2 report sec. 2.3).

`tiny` with 8, 16, 32, 64 and 128 routed experts (8 per token plus one shared, expert width 64;
sparsity 1 to 16), each trained 200 steps of 16 x 128 tokens with MuonClip at lr 1e-2 (train.py's
defaults otherwise), once per seed. The final model of every run is then scored on the same
validation batches (summarize.fixed_val_loss), so the seeds change the initial weights and the
order of the training batches only, and a difference between two settings is measured on the same
text. The table and plot come from summarize.py.

    python experiments/sparsity.py --seeds 0 1 2 --jobs 2 --plot assets/exp-c-sparsity.png

does all of it: every run not yet finished (runs/sparsity/e<E>-s<seed>, output in the .log beside
it), then the scores, then the table. Each run is

    python train.py --set n_routed_experts=E --seed S --max-steps 200 --eval-interval 25 \\
        --ckpt-interval 200 --keep-ckpts 1 --sample-tokens 0 --out runs/sparsity/eE-sS
"""
import argparse
import os

import summarize  # first: it puts the repository's modules on the path, and train.py's thread policy
from data import number

EXPERTS = (8, 16, 32, 64, 128)


def run_dir(out, experts, seed):
    return os.path.join(out, f"e{experts}-s{seed}")


def runs(out, experts, seeds) -> dict:
    return {run_dir(out, e, s): ["--set", f"n_routed_experts={e}", "--seed", str(s), *summarize.SWEEP]
            for s in seeds for e in experts}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=number(int, 1), default=1, help="runs at a time (with OMP_NUM_THREADS=1 each)")
    p.add_argument("--out", default="runs/sparsity")
    p.add_argument("--plot", help="PNG (needs matplotlib)")
    args = p.parse_args(argv)
    summarize.sweep(runs(args.out, args.experts, args.seeds), args.jobs, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
