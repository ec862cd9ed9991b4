"""Build a registered stream by name with checked options; `topocl stream show NAME [k=v ...] [--time]`."""

from __future__ import annotations

import argparse
import inspect
import time
import typing
from collections import Counter
from collections.abc import Sequence

from topocl.config import from_dict, to_dict
from topocl.registry import STREAMS
from topocl.tasks import campaign, capacity, jsonl, worlds  # noqa: F401  (register the streams)
from topocl.tasks.base import Task, apply_order, order_permutation, probe_groups


def stream_config(name: str, options: dict | None = None) -> object:
    build = STREAMS.get(name)
    cls = typing.get_type_hints(build)["cfg"]
    return from_dict(cls, options or {}, f"stream_options of '{name}'")


def build_stream(name: str, options: dict | None = None, order: int | Sequence[int] = 0) -> list[Task]:
    """Tasks of stream `name` in training order, labelled (retain / update, introduced_at) for that order.

    `order` is a seeded order (0 = the stream's own, k > 0 = a permutation seeded by k, constrained to what the
    stream allows: topocl.tasks.base.order_permutation) or an explicit permutation of the generation indices
    (refused when it trains a task before one it builds on). A stream whose builder takes no order (jsonl:
    labels written by the user for the file order) is permuted only when it has no update probes, whose
    labels a new order could falsify. Unknown option keys are a ConfigError naming the valid ones."""
    build = STREAMS.get(name)
    cfg = stream_config(name, options)
    tasks = build(cfg)
    if isinstance(order, int):
        if order == 0:
            return tasks
        order = order_permutation(len(tasks), order, [t.meta.get("after", []) for t in tasks])
    order = list(order)
    if "order" in inspect.signature(build).parameters:
        return build(cfg, order)
    if order != list(range(len(tasks))) and any(p.kind == "update" for t in tasks for p in t.probes):
        raise ValueError(f"stream {name!r}: its update labels were written for its own task order; another order "
                         f"({order}) could make them false, so only order 0 is allowed (or drop kind update)")
    return apply_order(tasks, order, name)


def summary(tasks: list[Task], examples: int = 2) -> str:
    probes = [p for t in tasks for p in t.probes]
    kinds = Counter(p.kind for p in probes)
    paraphrase = Counter(p.tags.get("paraphrase", "-") for p in probes)
    groups = Counter(g for p in probes for g in probe_groups(p) or ["headline"])
    headline = [sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) for t in tasks]
    lines = [f"{len(tasks)} tasks, {sum(len(t.texts) for t in tasks)} texts "
             f"({sum(len(x) for t in tasks for x in t.texts) / 1000:.0f} kB), {len(probes)} probes "
             f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})",
             f"probes per task: {min(len(t.probes) for t in tasks)}..{max(len(t.probes) for t in tasks)}; "
             f"paraphrase: {', '.join(f'{k} {v}' for k, v in sorted(paraphrase.items()))}",
             f"report groups: {', '.join(f'{k} {v}' for k, v in sorted(groups.items()))}; headline retain probes "
             f"per task: {min(headline)}..{max(headline)}", ""]
    for j, t in enumerate(tasks[:examples]):
        lines.append(f"task {j}: {t.name} — {len(t.texts)} texts, {len(t.probes)} probes")
        lines.append(f"  text:  {t.texts[0][:200]}")
        for p in t.probes[:3]:
            lines.append(f"  probe [{p.kind}] {p.prompt!r} -> {p.answer!r} of {p.candidates}")
    if len(tasks) > examples:
        lines.append(f"... {len(tasks) - examples} more tasks")
    shown = {p.kind for t in tasks[:examples] for p in t.probes[:3]}
    for kind in sorted(kinds.keys() - shown):  # one example of every kind not shown above
        p = next(p for p in probes if p.kind == kind)
        lines.append(f"example [{kind}] (task {p.introduced_at}) {p.prompt!r} -> {p.answer!r}  tags {p.tags}")
    return "\n".join(lines)


def token_count_spread(tasks: list[Task], tok) -> tuple[int, int]:
    """(probes whose candidates differ in token count after their prompt, probes) under tokenizer `tok`."""
    probes = [p for t in tasks for p in t.probes]
    differ = 0
    for p in probes:
        prompt = tok.encode(p.prompt)
        differ += len({len(tok.encode(p.prompt + c)) - len(prompt) for c in p.candidates}) > 1
    return differ, len(probes)


def time_probes(tasks: list[Task]) -> tuple[float, int]:
    """Seconds to score every probe of the stream with a tiny random GPT (d_model 128, 4 layers)."""
    import torch

    from topocl.config import ModelConfig
    from topocl.evaluate import score_probes
    from topocl.model import GPT
    from topocl.tokenizer import Tokenizer
    from topocl.world import synthetic_corpus

    tok = Tokenizer.train([x for t in tasks for x in t.texts] + synthetic_corpus(500, 0), 2048)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=256)).eval()
    probes = [p for t in tasks for p in t.probes]
    t0 = time.perf_counter()
    score_probes(model, tok, probes, device="cpu")
    return time.perf_counter() - t0, len(probes)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl stream", description="Inspect a task stream before training on it.")
    ap.add_argument("action", choices=["show"])
    ap.add_argument("name", help=f"stream: {', '.join(STREAMS.names())}")
    ap.add_argument("options", nargs="*", help="stream options, e.g. n_worlds=10 seed=3")
    ap.add_argument("--time", action="store_true", help="time scoring all probes with the tiny CPU model")
    ap.add_argument("--tokens", action="store_true", help="count probes whose candidates differ in token count")
    ap.add_argument("--order", type=int, default=0, help="task order as the runner's `orders` (labels follow it)")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.options if "=" in o)
    bad = [o for o in args.options if "=" not in o]
    if bad:
        raise ValueError(f"options must be key=value, got {bad}")
    cfg = stream_config(args.name, opts)
    print(f"stream {args.name}: {', '.join(f'{k}={v!r}' for k, v in to_dict(cfg).items())}, order {args.order}")
    tasks = build_stream(args.name, opts, args.order)
    print(summary(tasks))
    if args.tokens:
        from topocl.tokenizer import Tokenizer
        from topocl.world import synthetic_corpus

        tok = Tokenizer.train(synthetic_corpus(2000, 0), 2048)  # like the demo's: base corpus only, 2048 tokens
        differ, n = token_count_spread(tasks, tok)
        print(f"\nprobes whose candidates differ in token count (tiny demo tokenizer): {differ} of {n} "
              f"({differ / n:.1%})")
    if args.time:
        secs, n = time_probes(tasks)
        print(f"\nscored all {n} probes ({len(tasks)} tasks) with the tiny CPU model in {secs:.1f} s")
    return 0
