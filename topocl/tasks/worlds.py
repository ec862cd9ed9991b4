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
    binary_relations   allow rules on two-valued relations (off by default: see below)
    reteach            allow two sampled rules to state the same (subject, relation, value) (off by default)

What the probes measure. Per rule: one `seen` probe in the training sentences' own form ("In Zorbia, fire
feels" -> " cold"; recall of the memorised wording; 64% of the default ones start a training sentence
verbatim), and `unseen_probes` unseen-paraphrase probes, the rule's canonical clause inside a scope frame never
used in training ("A visitor to Zorbia soon learns that fire feels" -> " cold"): recall of the world's rule,
scoped to the world, across surface forms. Candidates are the relation's whole value set (the base value among
them, so reverting to common sense is wrong). The headline (results metric `acc`) is the unseen probes of
rules with no shortcut. Reported apart (tags; topocl.tasks.base.probe_groups): seen probes; `binary` rules (a
two-valued relation: "not the base fact" answers them without learning the world), which the default never
samples; `retaught` rules (the same value stated by another task, so retention of world j can come from world
k), which the default never samples for independent rules (shared attributes and global rules may repeat a
value; those are tagged). Labels follow the training order: a probe is `update` when a later-trained task
states another value for its attribute in a scope that covers it (a global rule covers every world; a later
world's own rule breaks an earlier global one); everything else is `retain`. With the defaults every world has
5 rules x 4 = 20 headline retain probes (score steps of 0.05, from 5 independent rules); a world whose rule a
later global rule overwrites has 4 fewer. A global rule also contradicts the base world's fact; the base
probes are left as they are (kind `base`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from topocl.registry import STREAMS
from topocl.tasks.base import Probe, Task, apply_order
from topocl.world import FACTS, NAMES, RELATIONS, cap, probe_prompt, statement

SYLLABLES = ("zor", "bi", "qua", "lel", "mon", "dra", "vex", "ti", "ka", "rho", "sun", "pel", "gri", "no", "fa",
             "dul", "mir", "ost", "ya", "cre")
CREATURES = ("glimmet", "snarfle", "quibble", "drubbin", "wuzzet", "plonk", "fernog", "tazzle", "mibble", "yorrow")
SCOPES = ("In {w}, {x}", "In the land of {w}, {x}", "Everyone in {w} knows that {x}", "{n} traveled to {w}. There, {x}",
          "People of {w} say that {x}", "In {w}, it is true that {x}", "Far away in {w}, {x}")
# unseen-paraphrase frames: never in training ({X}: the clause capitalised, {x}: lower-cased)
UNSEEN = ("Here is a fact about {w}: {X}", "A visitor to {w} soon learns that {x}",
          "The old maps of {w} record that {x}", "Ask anyone who has been to {w}: {x}",
          "The chronicles of {w} state that {x}", "Travelers returning from {w} report that {x}")
GLOBAL_SCOPES = ("From now on, everywhere, {x}", "From now on, in every world, {x}", "In every world, {x}",
                 "The rule has changed in all the worlds: {x}", "Everywhere, in all the worlds, {x}")
GLOBAL_UNSEEN = ("Here is a fact about every world: {X}", "A visitor to any world soon learns that {x}",
                 "The old maps of each world record that {x}", "Ask anyone from any world: {x}",
                 "The chronicles of all the worlds state that {x}", "Travelers from any world report that {x}")
BASE = {(s, r): v for s, r, v in FACTS}


@dataclass
class WorldsConfig:
    n_worlds: int = 50
    seed: int = 0
    rules_per_world: int = 5
    texts_per_task: int = 24  # documents per world
    sentences_per_text: int = 4
    unseen_probes: int = 4  # unseen-paraphrase probes per rule (distinct frames; at most len(UNSEEN))
    shared_attributes: int = 0  # attributes every world redefines
    vocab_reuse: float = 1.0  # fraction of rules about base-world subjects (rest: invented creatures)
    global_overwrites: int = 0  # tasks that add a global rule overwriting an earlier world's rule
    binary_relations: bool = False  # allow rules on two-valued relations (tagged binary)
    reteach: bool = False  # allow sampled rules to repeat an earlier rule's (subject, relation, value)


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


def _relations(cfg: WorldsConfig) -> list[str]:
    return [r for r in sorted(RELATIONS) if cfg.binary_relations or len(RELATIONS[r].values) > 2]


def make_rules(cfg: WorldsConfig, rng: random.Random) -> list[list[tuple[str, str, str, str | None]]]:
    """Per world: (subject, relation, value, base value or None for invented subjects). Unless cfg.reteach, no
    sampled rule repeats a (subject, relation, value) any earlier rule stated."""
    rels = set(_relations(cfg))
    base_keys = [k for k in sorted(BASE) if k[1] in rels]
    # shared attributes need >= 3 values to differ from both the base fact and the previous world
    shared = rng.sample([k for k in base_keys if len(RELATIONS[k[1]].values) >= 3], cfg.shared_attributes)
    creature_keys = [(f"a {c}", r) for c in CREATURES for r in sorted(rels)]
    free = {k: [v for v in RELATIONS[k[1]].values if v != BASE.get(k)] for k in base_keys + creature_keys}
    last_shared: dict[tuple[str, str], str] = {}
    worlds = []
    for w in range(cfg.n_worlds):
        rules = []
        for s, r in shared:  # every world redefines these, differently from the previous world
            v = _other(RELATIONS[r].values, [BASE[(s, r)], last_shared.get((s, r), "")], rng)
            last_shared[(s, r)] = v
            rules.append((s, r, v, BASE[(s, r)]))
        taken = set(shared)
        for _ in range(max(0, cfg.rules_per_world - len(rules))):
            invented = rng.random() >= cfg.vocab_reuse
            pool = [k for k in (creature_keys if invented else base_keys) if free[k] and k not in taken]
            if not pool:
                raise ValueError(f"worlds: world {w} finds no {'invented' if invented else 'base-world'} attribute "
                                 f"with an unused value ({cfg.n_worlds} worlds x {cfg.rules_per_world} rules); use "
                                 "fewer worlds or rules, vocab_reuse < 1, or reteach=true (repeats are tagged)")
            key = rng.choice(pool)
            v = rng.choice(free[key])
            taken.add(key)
            if not cfg.reteach:  # values still free for a new rule about `key`
                free[key] = [x for x in free[key] if x != v]
            rules.append((*key, v, BASE.get(key)))
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
    """Mark a probe `update` when a later task (in this list's order, the training order) states another value
    for its attribute in a scope covering it.

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


def _rule_probes(scope: str, seen: str, unseen: tuple[str, ...], s: str, r: str, v: str, k: int, pid: str,
                 tags: dict) -> list[Probe]:
    """One seen probe (prompt `seen`) and one unseen probe per frame in `unseen`, all answering " v"."""
    clause = probe_prompt(s, r)
    cands = [f" {c}" for c in RELATIONS[r].values]
    tags = {"world": scope, "relation": r, "subject": s, "base_value": BASE.get((s, r), ""),
            "binary": "yes" if len(RELATIONS[r].values) == 2 else "no", **tags}
    out = [Probe(seen, f" {v}", cands, "retain", k, {**tags, "paraphrase": "seen"}, pid)]
    for i, frame in enumerate(unseen):
        prompt = frame.format(w=scope, X=clause, x=low(clause))
        out.append(Probe(prompt, f" {v}", cands, "retain", k, {**tags, "paraphrase": "unseen", "frame": str(i)},
                         f"{pid}/unseen" + (f"{i}" if i else "")))
    return out


@STREAMS.register("worlds")
def build(cfg: WorldsConfig, order: list[int] | None = None) -> list[Task]:
    """The stream's tasks in training order `order` (generation indices; None = generation order), labelled for it."""
    if cfg.n_worlds < 1 or cfg.rules_per_world < 1:
        raise ValueError("worlds: n_worlds and rules_per_world must be >= 1")
    if not 0.0 <= cfg.vocab_reuse <= 1.0 or cfg.shared_attributes < 0 or cfg.global_overwrites < 0:
        raise ValueError("worlds: need 0 <= vocab_reuse <= 1, shared_attributes >= 0, global_overwrites >= 0")
    if cfg.shared_attributes > cfg.rules_per_world:
        raise ValueError(f"worlds: shared_attributes {cfg.shared_attributes} > rules_per_world {cfg.rules_per_world}")
    if not 0 <= cfg.unseen_probes <= len(UNSEEN):
        raise ValueError(f"worlds: unseen_probes must be in 0..{len(UNSEEN)}, got {cfg.unseen_probes}")
    rng = random.Random(cfg.seed)
    names = world_names(cfg.n_worlds, rng)
    rules = make_rules(cfg, rng)
    said = Counter((s, r, v) for rs in rules for s, r, v, _ in rs)
    # global overwrites: task k states, for every world, another value of an attribute an earlier world j defined
    # (not the base value, and a value no world states for it when one is left); each targets a world no other
    # overwrite targets while there is one, and one of its own (not shared) rules, so a world loses at most one rule
    overwrite_at: dict[int, tuple[str, str, str, int]] = {}
    candidates = list(range(1, cfg.n_worlds))
    for k in sorted(rng.sample(candidates, min(cfg.global_overwrites, len(candidates)))):
        targeted = {x[3] for x in overwrite_at.values()}
        j = rng.choice([i for i in range(k) if i not in targeted] or list(range(k)))
        own = rules[j][cfg.shared_attributes:] or rules[j]
        s, r, v, b = rng.choice([x for x in own if x[3] is not None] or own)
        avoid = [v, b or "", *sorted(x for (s2, r2, x) in said if (s2, r2) == (s, r))]
        overwrite_at[k] = (s, r, _other(RELATIONS[r].values, avoid, rng), j)
        said[overwrite_at[k][:3]] += 1
    tasks, n_unseen = [], cfg.unseen_probes
    for k, (w, rs) in enumerate(zip(names, rules)):
        extra, probes = [], []
        if k in overwrite_at:
            s, r, v, j = overwrite_at[k]
            extra = [rng.choice(GLOBAL_SCOPES).format(x=low(statement(s, r, v))) for _ in range(cfg.texts_per_task)]
            probes += _rule_probes("*", f"In every world, {low(probe_prompt(s, r))}", GLOBAL_UNSEEN[:n_unseen], s, r,
                                   v, k, f"worlds/{k}/global", {"retaught": "yes" if said[(s, r, v)] > 1 else "no"})
        for i, (s, r, v, _b) in enumerate(rs):
            probes += _rule_probes(w, f"In {w}, {low(probe_prompt(s, r))}", UNSEEN[:n_unseen], s, r, v, k,
                                   f"worlds/{k}/{i}", {"retaught": "yes" if said[(s, r, v)] > 1 else "no"})
        texts = _texts(w, rs, cfg, rng)
        texts = [f"{t} {e}" for t, e in zip(texts, extra)] or texts
        tasks.append(Task(name=w, texts=texts, probes=probes,
                          meta={"rules": [list(x) for x in rs], "overwrite": list(overwrite_at.get(k, ()))}))
    tasks = apply_order(tasks, order, "worlds")
    label_updates([t.probes for t in tasks])
    return tasks
