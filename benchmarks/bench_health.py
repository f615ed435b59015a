"""Step-time cost of health monitoring at its default settings.

2 ranks on gloo, the bench_step workload (MLP 784-1024-1024-10, batch 64 per rank). Rounds alternate
Shoal with the default health settings (measurements every 10 steps) and Shoal with measurements
pushed out of the run (health.every=10**9; the per-step finite and divergence checks stay, they are
part of the step); the figure is the median ratio.

    python benchmarks/bench_health.py [--rounds 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile

from bench_step import shoal_rank

from _common import machine, median, spawn_ranks, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    args = p.parse_args()
    rows, ratios = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            runs = {"off": ("health.every=1000000000",), "on": ()}
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]  # alternate which goes first
            got = {
                k: spawn_ranks(shoal_rank, 2, args.steps, args.warmup, f"{d}/{k}", 1, runs[k], timeout_s=600)[0]
                for k in order
            }
            off, on = got["off"], got["on"]
        ratios.append(on / off)
        rows.append([r + 1, off * 1000, on * 1000, on / off])
        print(
            f"round {r + 1}: without {off * 1000:.2f} ms/step, with health {on * 1000:.2f} ms/step, ratio {on / off:.3f}",
            flush=True,
        )
    print(f"\n2 ranks gloo, MLP 784-1024-1024-10, batch 64/rank; {machine()}")
    print(table(["round", "measurements off ms/step", "default health ms/step", "ratio"], rows))
    print(f"\nmedian ratio with / without health measurements: {median(ratios):.3f}")


if __name__ == "__main__":
    main()
