"""`worlds` ("window-breaking"): fictional worlds whose rules contradict the base common-sense world.

Task j teaches world j's rules, scoped by its name ("In Zorbia, fire feels cold."), through varied
paraphrased stories. Each rule names a base fact (topocl.world.FACTS) and gives it another value from
the relation's value set, so the contradiction is real. Controls:
    shared_attributes  the first K (subject, relation) attributes appear in every world, each world with a
                       value different from the base and the previous world's (worlds contradict each other)
    vocab_reuse        fraction of rules about base subjects; the rest are about invented creatures
                       ("a glimmet"), new vocabulary with no base fact to contradict
    global_overwrites  tasks that also state a global rule ("From now on, everywhere, fire feels cold.") about
                       an attribute an earlier world set
Probes: one canonical ("In Zorbia, fire feels" -> " cold") and one unseen-paraphrase probe per rule, plus two
for each global rule. A probe is `update` when a later task states another value for its attribute in a scope
that covers it (a global rule covers every world; a later world's own rule breaks an earlier global one):
overwriting it is not forgetting. Everything else is `retain`. Note that a global rule also contradicts the
base world's fact; the base probes are left as they are (kind `base`).
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
GLOBAL_SCOPES = ("From now on, everywhere, {x}", "From now on, in every world, {x}", "In every world, {x}",
                 "The rule has changed in all the worlds: {x}", "Everywhere, in all the worlds, {x}")
GLOBAL_UNSEEN = "Here is a fact about every world: {x}"
BASE = {(s, r): v for s, r, v in FACTS}


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
    base = BASE
    # shared attributes need >= 3 values to differ from both the base fact and the previous world
    shared = rng.sample([k for k in sorted(base) if len(RELATIONS[k[1]].values) >= 3], cfg.shared_attributes)
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


def _texts(w: str, rules: list[tuple], cfg: WorldsConfig, rng: random.Random) -> list[str]:
    texts = []
    for _ in range(cfg.texts_per_task):
        n = rng.choice(NAMES)
        sents = []
        for s, r, v, _ in rng.sample(rules, min(cfg.sentences_per_text, len(rules))):
            rel = RELATIONS[r]
            x = statement(s, r, v, rng.choice((rel.canonical, rel.canonical, *rel.templates)), n)
            sents.append(rng.choice(SCOPES).format(w=w, x=low(x), n=n))
        texts.append(" ".join(sents))
    return texts


def label_updates(probes_by_task: list[list[Probe]]) -> None:
    """Mark a probe `update` when a later task states another value for its attribute in a scope covering it.

    Scopes: a world name or "*" (global). A later global rule covers every world and earlier global rules; a
    later world rule covers its own world and any earlier global rule (it makes "in every world" false).
    """
    later: dict[tuple[str, str], list[tuple[int, str, str]]] = {}  # (subject, relation) -> (task, scope, value)
    for k, probes in enumerate(probes_by_task):
        for p in probes:
            later.setdefault((p.tags["subject"], p.tags["relation"]), []).append((k, p.tags["world"], p.answer))
    for k, probes in enumerate(probes_by_task):
        for p in probes:
            w, v = p.tags["world"], p.answer
            if any(m > k and v2 != v and (w2 == w or "*" in (w, w2))
                   for m, w2, v2 in later[(p.tags["subject"], p.tags["relation"])]):
                p.kind = "update"


@STREAMS.register("worlds")
def build(cfg: WorldsConfig) -> list[Task]:
    if cfg.n_worlds < 1 or cfg.rules_per_world < 1:
        raise ValueError("worlds: n_worlds and rules_per_world must be >= 1")
    if not 0.0 <= cfg.vocab_reuse <= 1.0 or cfg.shared_attributes < 0 or cfg.global_overwrites < 0:
        raise ValueError("worlds: need 0 <= vocab_reuse <= 1, shared_attributes >= 0, global_overwrites >= 0")
    if cfg.shared_attributes > cfg.rules_per_world:
        raise ValueError(f"worlds: shared_attributes {cfg.shared_attributes} > rules_per_world {cfg.rules_per_world}")
    rng = random.Random(cfg.seed)
    names = world_names(cfg.n_worlds, rng)
    rules = make_rules(cfg, rng)
    # global overwrites: task k states, for every world, another value of an attribute an earlier world j defined
    overwrite_at: dict[int, tuple[str, str, str, int]] = {}
    candidates = list(range(1, cfg.n_worlds))
    for k in sorted(rng.sample(candidates, min(cfg.global_overwrites, len(candidates)))):
        j = rng.randrange(k)
        s, r, v, b = rng.choice([x for x in rules[j] if x[3] is not None] or rules[j])
        overwrite_at[k] = (s, r, _other(RELATIONS[r].values, [v], rng), j)
    tasks = []
    for k, (w, rs) in enumerate(zip(names, rules)):
        extra, probes = [], []
        if k in overwrite_at:
            s, r, v, j = overwrite_at[k]
            x = low(statement(s, r, v))
            extra = [rng.choice(GLOBAL_SCOPES).format(x=x) for _ in range(cfg.texts_per_task)]
            tags = {"world": "*", "relation": r, "subject": s, "base_value": BASE.get((s, r), "")}
            cands = [f" {c}" for c in RELATIONS[r].values]
            probes.append(Probe(f"In every world, {low(probe_prompt(s, r))}", f" {v}", cands, "retain", k,
                                {**tags, "paraphrase": "seen"}, f"worlds/{k}/global"))
            probes.append(Probe(GLOBAL_UNSEEN.format(x=probe_prompt(s, r)), f" {v}", cands, "retain", k,
                                {**tags, "paraphrase": "unseen"}, f"worlds/{k}/global/unseen"))
        for i, (s, r, v, b) in enumerate(rs):
            cands = [f" {c}" for c in RELATIONS[r].values]
            tags = {"world": w, "relation": r, "subject": s, "base_value": b or ""}
            probes.append(Probe(f"In {w}, {low(probe_prompt(s, r))}", f" {v}", cands, "retain", k,
                                {**tags, "paraphrase": "seen"}, f"worlds/{k}/{i}"))
            probes.append(Probe(UNSEEN.format(w=w, x=probe_prompt(s, r)), f" {v}", cands, "retain", k,
                                {**tags, "paraphrase": "unseen"}, f"worlds/{k}/{i}/unseen"))
        texts = _texts(w, rs, cfg, rng)
        texts = [f"{t} {e}" for t, e in zip(texts, extra)] or texts
        tasks.append(Task(name=w, texts=texts, probes=probes,
                          meta={"rules": [list(x) for x in rs], "overwrite": list(overwrite_at.get(k, ()))}))
    label_updates([t.probes for t in tasks])
    return tasks
