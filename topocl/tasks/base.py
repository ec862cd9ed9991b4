"""Tasks and probes: what a continual stream is made of.

A `Task` has training texts (paraphrased, varied surface forms) and `Probe`s. A probe is scored by
greedy exact match of `answer` after `prompt`, and by ranking `candidates` (which include `answer`)
by total log-likelihood. `kind` separates what must be kept from what may be overwritten:
    retain  must still be known later
    update  deliberately contradicted by a later task (overwriting it is not forgetting)
    base    pretraining knowledge (general ability)
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_KINDS = ("retain", "update", "base")


@dataclass
class Probe:
    prompt: str  # text the model continues, e.g. "In Zorbia, water flows"
    answer: str  # expected continuation including its leading space, e.g. " uphill"
    candidates: list[str]  # alternatives ranked by log-likelihood; always contains `answer`
    kind: str = "retain"  # retain | update | base
    introduced_at: int = -1  # index of the task that taught it (-1 = pretraining)
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
    meta: dict = field(default_factory=dict)
