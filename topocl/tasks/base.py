"""Tasks and probes: what a continual stream is made of, and the order it is trained in.

A `Task` has training texts (paraphrased, varied surface forms) and `Probe`s. A probe is scored by
greedy exact match of `answer` after `prompt`, and by ranking `candidates` (which include `answer`)
by mean log-likelihood per token (topocl.evaluate). `kind` separates what must be kept from what may be
overwritten:
    retain  must still be known later
    update  deliberately contradicted by a later task in the training order (overwriting it is not forgetting)
    base    pretraining knowledge (general ability)
Kinds and `introduced_at` follow the order the tasks are trained in: a stream generator takes that order
(`apply_order`) and labels the sequence it returns.

Report groups (`probe_groups`): a probe that may be answered by a shortcut is reported in its own rows, not in
the headline. The headline (results metric `acc`, what the report's tables use) holds the probes in no group:
    seen      tags paraphrase == "seen": the prompt has the training sentences' own form (most are verbatim
              starts of training sentences): recall of the memorised wording
    binary    tags binary == "yes": a rule on a two-valued relation, answered by "not the base fact" without
              learning the task
    retaught  tags retaught == "yes": another task states the same value, so its retention can come from there
Each group g (and "all", every probe of the kind) gets the result metric `acc@g` (topocl.continual.Evaluator).
A user's jsonl probe is a headline probe unless its tags put it in a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PROBE_KINDS = ("retain", "update", "base")
SHORTCUT_GROUPS = ("seen", "binary", "retaught")


@dataclass
class Probe:
    prompt: str  # text the model continues, e.g. "In Zorbia, water flows"
    answer: str  # expected continuation including its leading space, e.g. " uphill"
    candidates: list[str]  # alternatives ranked by log-likelihood; always contains `answer`
    kind: str = "retain"  # retain | update | base
    introduced_at: int = -1  # training position of the task that taught it (-1 = pretraining)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. {"relation": "flow", "paraphrase": "unseen"}
    id: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe {self.id or self.prompt!r}: kind {self.kind!r} not in {PROBE_KINDS}")
        if self.answer not in self.candidates:
            raise ValueError(f"probe {self.id or self.prompt!r}: answer {self.answer!r} not among candidates")


@dataclass
class Task:
    name: str
    texts: list[str]  # training documents
    probes: list[Probe]
    meta: dict = field(default_factory=dict)  # "after": generation indices of tasks that must be trained earlier


def probe_groups(p: Probe) -> list[str]:
    """The shortcut groups (SHORTCUT_GROUPS) a probe belongs to; [] = a headline probe."""
    return [g for g, hit in (("seen", p.tags.get("paraphrase") == "seen"), ("binary", p.tags.get("binary") == "yes"),
                             ("retaught", p.tags.get("retaught") == "yes")) if hit]


def order_permutation(n: int, order: int, after: Sequence[Sequence[int]] = ()) -> list[int]:
    """Generation indices in training order. Order 0 is the stream's own; order k > 0 is a permutation seeded by k
    (torch.randperm, seed 10_000 + k). With `after` (task i needs every task in after[i] trained before it),
    the seeded permutation is constrained to a valid one: repeatedly the first task of the seeded permutation
    whose prerequisites are placed (the seeded permutation itself when it is valid)."""
    import torch

    if order < 0:
        raise ValueError(f"task order must be >= 0, got {order}")
    if order == 0:
        return list(range(n))
    seeded = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + order)).tolist()
    need = [set(after[i]) if i < len(after) else set() for i in range(n)]
    out: list[int] = []
    placed: set[int] = set()
    while seeded:
        i = next((i for i in seeded if need[i] <= placed), None)
        if i is None:
            raise ValueError(f"task prerequisites form a cycle among tasks {sorted(seeded)}")
        seeded.remove(i)
        out.append(i)
        placed.add(i)
    return out


def apply_order(tasks: list[Task], order: Sequence[int] | None, stream: str) -> list[Task]:
    """`tasks` (generation order) in training order `order`: every probe's introduced_at becomes its task's
    training position and every task probe's kind is reset to retain (the stream labels updates afterwards).
    A non-permutation, or an order that trains a task before one it needs (meta "after"), is refused."""
    order = list(range(len(tasks))) if order is None else list(order)
    if sorted(order) != list(range(len(tasks))):
        raise ValueError(f"{stream}: task order {order} is not a permutation of the tasks 0..{len(tasks) - 1}")
    pos = {g: k for k, g in enumerate(order)}
    for g, t in enumerate(tasks):
        for dep in t.meta.get("after", []):
            if pos[dep] > pos[g]:
                raise ValueError(f"{stream}: task order {order} trains task {g} ({t.name}) at position {pos[g]}, "
                                 f"before task {dep} ({tasks[dep].name}) that it builds on (position {pos[dep]}); "
                                 "use an order that keeps it after (seeded orders are constrained automatically)")
    out = [tasks[g] for g in order]
    for k, t in enumerate(out):
        t.meta["generated"] = order[k]
        for p in t.probes:
            p.introduced_at = k
            if p.kind != "base":
                p.kind = "retain"
    return out
