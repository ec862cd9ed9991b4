"""`topocl <command> ...`: each command lives in its own module and parses its own arguments.

To add a command, add one line to COMMANDS: name -> (module, one-line help). The module defines
`cli(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import sys

from topocl.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("topocl.pretrain", "pretrain a model from scratch: topocl pretrain CONFIG [k=v ...]"),
    "demo": ("topocl.demo", "the embedded default end to end on CPU (what make demo runs)"),
    "metrics": ("topocl.results", "named CL metrics of results.jsonl files as JSON: topocl metrics RESULTS [...]"),
    "report": ("topocl.report", "comparison report (report.md + PNGs) of run directories: topocl report RUN [...]"),
    "sweep": ("topocl.sweep", "a grid of runs in one directory: topocl sweep SWEEP.yaml [k=v ...] [--dry-run]"),
    "study": ("topocl.study_exec", "a resumable study (studies/<name>): topocl study STUDY.yaml [--budget 2h] "
                              "[--shard i/n] | status DIR | report DIR"),
    "stream": ("topocl.tasks.streams", "inspect a task stream: topocl stream show NAME [k=v ...] [--time]"),
    "continual": ("topocl.continual", "run a task stream on a pretrained model: topocl continual CONFIG [k=v ...]"),
    "analyze": ("topocl.analysis.cli", "grafting, routing, sparsity, H1-H3 evidence: topocl analyze RUN [...]"),
    "params": ("topocl.params", "parameters per role (and the matched dense control): topocl params CONFIG"),
    "surgery": ("topocl.surgery.cli", "head-split surgery on an HF model: topocl surgery CONFIG | inspect MODEL"),
    "capacity": ("topocl.capacity", "capacity-ceiling study over (model x n tasks x d facts): topocl capacity CONFIG"),
    "arena": ("topocl.arena.cli", "human-vote arena for long role-play: topocl arena serve | ratings | loadtest"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    return "usage: topocl <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"topocl: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.cli(rest) or 0)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"topocl {name}: error: {msg}", file=sys.stderr)
        return 1
