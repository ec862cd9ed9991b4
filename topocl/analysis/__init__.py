"""Analysis instruments: the hypotheses, measured (DESIGN.md "Analysis instruments").

Stages write artifacts; reports only read them.

    telemetry.py  during a run (analysis.telemetry=true): per-role gradient cosine between tasks, drift
                  ||Δθ||/||θ|| vs stream / task start, Fisher-weighted drift -> seed{S}-order{O}/telemetry.jsonl
    graft.py      after a run: restore a role group's pre-/post-task weights into the final model and
                  re-score the probes -> seed{S}-order{O}/analysis/graft.jsonl
    routing.py    Jaccard of selected tokens / blocks between checkpoints, NSA gate drift, attention mass on
                  the probed fact's tokens -> .../analysis/routing.jsonl
    sparsity.py   activation sparsity and effective rank per module and role, before / after the stream
                  -> .../analysis/sparsity.jsonl
    crossover.py  target-domain curves of an arm and its dense baseline, crossover task (bootstrap interval
                  over replicates), joint ceiling
    frontier.py   stability–plasticity frontier: F vs LA per arm over its learning-rate grid, ΔF at matched LA
    evidence.py   H1/H2/H3: numbers with 95% t-CIs over replicates (pretraining seeds) and a verdict computed
                  by a stated rule (n >= 5 replicates, paired differences); docs/protocol.md
    render.py     analysis.md + PNGs from the artifacts; cli.py is `topocl analyze`

This package's __init__ imports nothing, so the torch-free modules (crossover, frontier, evidence, render, artifacts)
can be used by reports without importing torch.
"""
