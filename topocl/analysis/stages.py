"""The post-hoc analysis stages on one continual run directory (grafting, routing, sparsity), writing
seed{S}-order{O}/analysis/{stage}.jsonl: the library part of `topocl analyze` (topocl.analysis.cli), also used
by `topocl demo`.
"""

from __future__ import annotations

from pathlib import Path

from topocl.analysis.artifacts import GRAFT_MODES, stream_dirs, write_jsonl


def analyze_run(run_dir: Path, stages: list[str], device: str = "auto", graft_roles: list[str] | None = None,
                max_probes: int = 8, graft_modes: tuple[str, ...] = GRAFT_MODES) -> list[str]:
    """Run `stages` on every stream of one run directory (grafting in `graft_modes`, topocl/analysis/graft.py);
    returns notes about skipped stages."""
    from topocl.analysis import graft, routing, sparsity
    from topocl.analysis.load import open_stream

    notes = []
    for seed, order, d in stream_dirs(run_dir):
        st = open_stream(run_dir, seed, order, device)
        have_all = set(range(len(st.tasks) + 1)) - {0} <= set(st.checkpoints)
        for stage in stages:
            if stage in ("graft", "routing") and not have_all:
                notes.append(f"{d}: {stage} skipped: needs every task checkpoint "
                             "(run with analysis.keep_task_checkpoints=true)")
                continue
            if stage == "graft":
                rows = graft.run_graft(st, graft.graft_groups(st.model, graft_roles), modes=tuple(graft_modes))
            elif stage == "routing":
                rows = routing.run_routing(st, max_probes)
            else:
                rows = sparsity.run_sparsity(st)
            write_jsonl(d / "analysis" / f"{stage}.jsonl", rows)
    return notes
