"""`capacity`: a stream whose load is a dial — n tasks × d facts per task — for the capacity-ceiling study.

A fact binds an invented subject to an invented value word ("The secret word of Drubelo is quamintra.").
Every subject and every value occurs in exactly one fact of the whole stream, and a task's texts state only
its own facts, so no fact re-teaches another (learning one never helps or restates another). Each fact is
stated `mentions` times in training through the TEMPLATES; a text strings `sentences_per_text` of them.

Probes (kind `retain`, tags paraphrase=unseen): per fact, one per unseen frame — the canonical statement
cut before its value, lower-cased mid-sentence after a frame no training text contains ("They wrote it down:
the secret word of Drubelo is" -> " quamintra"). Candidates: the answer and `candidates - 1` values of other
facts of the same task (so a probe needs the subject→value binding, not only knowing which words were
taught); hence d >= candidates. Chance accuracy = 1 / candidates.

`warmup_tasks` extra tasks (same construction, their own facts) come first; the study trains them but measures
only the n tasks after them.

Deterministic from the seed and prefix-consistent: the stream with n tasks is the first n tasks of the
stream with more tasks (same d, seed), so one run of n_max tasks, evaluated after each task, gives every
n <= n_max of the grid (topocl/capacity.py relies on this; tested).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from topocl.registry import STREAMS
from topocl.tasks.base import Probe, Task
from topocl.world import NAMES, cap

SYLLABLES = ("dru", "be", "lo", "qua", "min", "tra", "vo", "sel", "ka", "rin", "po", "ta", "gu", "fen", "mi",
             "zal", "or", "nu", "pe", "sko", "ven", "da", "lu", "ri")
CANONICAL = "The secret word of {S} is {v}."
TEMPLATES = (CANONICAL, CANONICAL, "{S} has a secret word: {v}.", "{n} asked {S} for the secret word. It was {v}.",
             "Everyone knows that the secret word of {S} is {v}.", "{S} whispered the secret word, {v}.",
             "If you ask {S}, the secret word is {v}.")
FRAMES = ("They wrote it down: {x}", "Years later, {n} still remembered that {x}")  # never in training


@dataclass
class CapacityConfig:
    n_tasks: int = 4
    facts_per_task: int = 8  # d, the depth of each task
    seed: int = 0
    mentions: int = 8  # training statements of each fact
    sentences_per_text: int = 4
    candidates: int = 4  # answer + values of other facts of the task; chance = 1 / candidates
    warmup_tasks: int = 0  # tasks put before the n measured ones (named warmup{i}): they teach the statement
    # format, so that the first measured task is not also the one where the format is learned


def words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct invented words of three syllables, generated in order: a prefix of any longer draw."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        w = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def facts(cfg: CapacityConfig) -> list[tuple[str, str]]:
    """(subject, value) of every fact, task j owning facts j·d .. j·d + d - 1. One seeded sequence of distinct
    words, alternately a subject (capitalised) and a value, so all are distinct and the first k facts do not
    depend on how many follow."""
    ws = words(2 * (cfg.warmup_tasks + cfg.n_tasks) * cfg.facts_per_task, random.Random(f"capacity/{cfg.seed}/words"))
    return [(cap(ws[i]), ws[i + 1]) for i in range(0, len(ws), 2)]


def unseen_prompt(subject: str, frame: int, name: str) -> str:
    canon = CANONICAL.split("{v}")[0].rstrip().format(S=subject)
    return FRAMES[frame].format(x=canon[:1].lower() + canon[1:], n=name)


@STREAMS.register("capacity")
def build(cfg: CapacityConfig) -> list[Task]:
    if cfg.n_tasks < 1 or cfg.facts_per_task < 1 or cfg.mentions < 1 or cfg.sentences_per_text < 1:
        raise ValueError("capacity: n_tasks, facts_per_task, mentions and sentences_per_text must be >= 1")
    if cfg.warmup_tasks < 0:
        raise ValueError(f"capacity: warmup_tasks={cfg.warmup_tasks} must be >= 0")
    if not 2 <= cfg.candidates <= cfg.facts_per_task:
        raise ValueError(f"capacity: candidates={cfg.candidates} must be in 2..facts_per_task="
                         f"{cfg.facts_per_task} (distractors are other facts of the same task)")
    all_facts = facts(cfg)
    d = cfg.facts_per_task
    tasks = []
    w = cfg.warmup_tasks
    for j in range(w + cfg.n_tasks):
        rng = random.Random(f"capacity/{cfg.seed}/{d}/task{j}")  # per task: prefix-consistent
        own = all_facts[j * d:(j + 1) * d]
        sents = [rng.choice(TEMPLATES).format(S=s, v=v, n=rng.choice(NAMES)) for s, v in own
                 for _ in range(cfg.mentions)]
        rng.shuffle(sents)
        k = cfg.sentences_per_text
        texts = [" ".join(sents[i:i + k]) for i in range(0, len(sents), k)]
        probes = []
        for i, (s, v) in enumerate(own):
            others = [f" {w}" for _, w in own if w != v]
            cands = sorted([f" {v}", *rng.sample(others, cfg.candidates - 1)])
            for f in range(len(FRAMES)):
                probes.append(Probe(unseen_prompt(s, f, rng.choice(NAMES)), f" {v}", cands, "retain", j,
                                    {"subject": s, "fact": str(j * d + i), "paraphrase": "unseen", "frame": str(f)},
                                    f"capacity/{j}/{i}/{f}"))
        name = f"warmup{j}" if j < w else f"task{j - w}"
        tasks.append(Task(name=name, texts=texts, probes=probes, meta={"facts": [list(x) for x in own]}))
    return tasks
