"""False "supported" rate of the H2 verdict rule under the null, n = 2..10 replicates (docs/protocol.md).

    python benchmarks/verdict_null.py [--sims 4000] [--seed 0]

Arm and baseline are drawn from the same process (topocl.analysis.evidence.simulate_null: simulated accuracy
matrices -> forgetting_chaudhry -> per-replicate means -> paired differences -> verdict). Columns: the rule
(t-CI, n >= 5), the same t-CI without the n >= 5 gate, and the old rule (95% percentile bootstrap of the
paired differences, 2000 resamples, verdict from n >= 2) on the same simulated data model.
"""

from __future__ import annotations

import argparse
import random

from topocl import metrics as M
from topocl.analysis import evidence as E
from topocl.results import by_unit


def old_rule_rate(n: int, sims: int, seed: int) -> float:
    """The rule before this protocol: percentile bootstrap CI of the paired differences, n >= 2."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(sims):
        arms = []
        for _arm in range(2):
            per = {}
            for r in range(n):
                quality = 0.75 + rng.gauss(0, 0.08)
                for s in range(2):
                    per[(r, s)] = M.forgetting_chaudhry(E._null_matrix(rng, 4, quality, 20))
            arms.append(by_unit(per, {k: k[0] for k in per}))
        _, _, hi = M.bootstrap_ci([arms[0][u] - arms[1][u] for u in arms[0]])
        hits += n >= 2 and hi < 0
    return hits / sims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=4000)
    ap.add_argument("--old-sims", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| n replicates | rule (t-CI, n ≥ 5) | t-CI without the n ≥ 5 gate | old rule (percentile bootstrap) |")
    print("|---|---|---|---|")
    for n in range(2, 11):
        rule = E.simulate_null(n, args.sims, args.seed)
        ungated = E.simulate_null(n, args.sims, args.seed, min_n=2)
        old = old_rule_rate(n, args.old_sims, args.seed)
        print(f"| {n} | {100 * rule:.1f}% | {100 * ungated:.1f}% | {100 * old:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
