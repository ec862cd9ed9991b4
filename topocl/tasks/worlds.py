"""`worlds` ("window-breaking"): fictional worlds whose rules contradict the base common-sense world.

Task j teaches world j's rules, scoped by its name ("In Zorbia, fire feels cold."), through varied
paraphrased stories. Each rule names a base fact (topocl.world.FACTS) and gives it another value from
the relation's value set, so the contradiction is real. Controls:
    shared_attributes  the first K (subject, relation) attributes appear in every world, each world with a
                       value different from the previous world's (worlds contradict each other)
    vocab_reuse        fraction of rules about base subjects; the rest are about invented creatures
                       ("a glimmet"), new vocabulary with no base fact to contradict
    global_overwrites  tasks that also state a global rule ("In every world, fire now feels cold.") about an
                       attribute an earlier world set: that earlier probe becomes kind `update`
Probes: one canonical and one unseen-paraphrase probe per rule (`retain`, or `update` when overwritten).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from topocl.registry import STREAMS
from topocl.tasks.base import Probe, Task
from topocl.world import FACTS, NAMES, RELATIONS, cap, probe_prompt, statement

SYLLABLES = ("zor", "bi", "qua", "lel", "mon", "dra", "vex", "ti", "ka", "rho", "sun", "pel", "gri", "no", "fa",
             "dul", "mir", "ost", "ya", "cre")
CREATURES = ("glimmet", "snarfle", "quibble", "drubbin", "wuzzet", "plonk", "fernog", "tazzle", "mibble", "yorrow")
SCOPES = ("In {w}, {x}", "In the land of {w}, {x}", "Everyone in {w} knows that {x}", "{n} traveled to {w}. There, {x}",
          "People of {w} say that {x}", "In {w}, it is true that {x}", "Far away in {w}, {x}")
UNSEEN = "Here is a fact about {w}: {x}"


@dataclass
class WorldsConfig:
    n_worlds: int = 50
    seed: int = 0
    rules_per_world: int = 5
    texts_per_task: int = 24  # documents per world
    sentences_per_text: int = 4
    shared_attributes: int = 0  # attributes every world redefines
    vocab_reuse: float = 1.0  # fraction of rules about base-world subjects (rest: invented creatures)
    global_overwrites: int = 0  # tasks that add a global rule overwriting an earlier world's rule


def world_names(n: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        w = cap("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))))
        if w not in names:
            names.append(w)
    return names


def low(x: str) -> str:
    """Lower-case the first letter unless the sentence starts with a character's name."""
    return x if x.split(" ")[0].strip('",!.') in NAMES else x[:1].lower() + x[1:]


def _other(values: tuple[str, ...], avoid: list[str], rng: random.Random) -> str:
    """A value outside `avoid`; if none is left, one that differs from avoid[0] (the value that must change)."""
    return rng.choice([v for v in values if v not in avoid] or [v for v in values if v != avoid[0]])


def make_rules(cfg: WorldsConfig, rng: random.Random) -> list[list[tuple[str, str, str, str | None]]]:
    """Per world: (subject, relation, value, base value or None for invented subjects)."""
    base = {(s, r): v for s, r, v in FACTS}
    shared = rng.sample(sorted(base), cfg.shared_attributes) if cfg.shared_attributes else []
    last_shared: dict[tuple[str, str], str] = {}
    worlds = []
    for _ in range(cfg.n_worlds):
        rules = []
        for s, r in shared:  # every world redefines these, differently from the previous world
            v = _other(RELATIONS[r].values, [base[(s, r)], last_shared.get((s, r), "")], rng)
            last_shared[(s, r)] = v
            rules.append((s, r, v, base[(s, r)]))
        pool = [k for k in sorted(base) if k not in shared]
        for s, r in rng.sample(pool, max(0, cfg.rules_per_world - len(rules))):
            if rng.random() < cfg.vocab_reuse:
                rules.append((s, r, _other(RELATIONS[r].values, [base[(s, r)]], rng), base[(s, r)]))
            else:
                rules.append((f"a {rng.choice(CREATURES)}", r, rng.choice(RELATIONS[r].values), None))
        worlds.append(rules)
    return worlds


def _texts(w: str, rules: list[tuple], cfg: WorldsConfig, rng: random.Random, extra: list[str]) -> list[str]:
    texts = []
    for _ in range(cfg.texts_per_task):
        n = rng.choice(NAMES)
        sents = []
        for s, r, v, _ in rng.sample(rules, min(cfg.sentences_per_text, len(rules))):
            rel = RELATIONS[r]
            x = statement(s, r, v, rng.choice((rel.canonical, rel.canonical, *rel.templates)), n)
            sents.append(rng.choice(SCOPES).format(w=w, x=low(x), n=n))
        texts.append(" ".join(sents + extra))
    return texts


@STREAMS.register("worlds")
def build(cfg: WorldsConfig) -> list[Task]:
    if cfg.n_worlds < 1 or cfg.rules_per_world < 1:
        raise ValueError("worlds: n_worlds and rules_per_world must be >= 1")
    rng = random.Random(cfg.seed)
    names = world_names(cfg.n_worlds, rng)
    rules = make_rules(cfg, rng)
    # global overwrites: task k restates, for every world, an attribute an earlier world (j < k) defined
    overwrite_at: dict[int, tuple[str, str, str, int]] = {}
    candidates = list(range(1, cfg.n_worlds))
    for k in sorted(rng.sample(candidates, min(cfg.global_overwrites, len(candidates)))):
        j = rng.randrange(k)
        s, r, v, b = rng.choice([x for x in rules[j] if x[3] is not None] or rules[j])
        overwrite_at[k] = (s, r, _other(RELATIONS[r].values, [v], rng), j)
    overwritten = {(j, s, r) for s, r, _, j in overwrite_at.values()}
    tasks = []
    for k, (w, rs) in enumerate(zip(names, rules)):
        extra, probes = [], []
        if k in overwrite_at:
            s, r, v, j = overwrite_at[k]
            extra = [f"From now on, in every world, {low(statement(s, r, v))}"]
            prompt = f"In every world, {low(probe_prompt(s, r))}"
            probes.append(Probe(prompt, f" {v}", [f" {c}" for c in RELATIONS[r].values], "retain", k,
                                {"world": "*", "relation": r, "subject": s, "paraphrase": "seen", "global": "1"},
                                f"worlds/{k}/global"))
        for i, (s, r, v, b) in enumerate(rs):
            kind = "update" if (k, s, r) in overwritten else "retain"
            cands = [f" {c}" for c in RELATIONS[r].values]
            tags = {"world": w, "relation": r, "subject": s, "base_value": b or ""}
            probes.append(Probe(f"In {w}, {low(probe_prompt(s, r))}", f" {v}", cands, kind, k,
                                {**tags, "paraphrase": "seen"}, f"worlds/{k}/{i}"))
            probes.append(Probe(UNSEEN.format(w=w, x=probe_prompt(s, r)), f" {v}", cands, kind, k,
                                {**tags, "paraphrase": "unseen"}, f"worlds/{k}/{i}/unseen"))
        tasks.append(Task(name=w, texts=_texts(w, rs, cfg, rng, extra), probes=probes,
                          meta={"rules": [list(x) for x in rs], "overwrite": list(overwrite_at.get(k, ()))}))
    return tasks
