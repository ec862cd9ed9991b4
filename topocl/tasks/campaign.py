"""`campaign` (TRPG long-range memory): a role-play campaign told in sessions, one task per session.

Each session introduces fine-grained facts — who gave whom which item with which enchantment, where it is
kept, on which night. `rules` of the campaign's world rules (its magic system) are each taught in one
session only, chosen by the seed, and never restated, so they are tested after a delay like the facts.
`changes` later sessions move an earlier item in-story (an item may move twice, never back to a place it
was kept before; a move names neither owner nor giver, so no fact is taught twice).

What the probes measure. Per fact, four questions (owner, giver, night, place), each asked twice: `seen`, the
training sentence cut before the answer ("The frost sword belongs to" -> " Tom"; verbatim recall), and
unseen, the same clause inside a frame never used in training ("The game master's notes record that the
frost sword belongs to"). Per rule, the same two forms ("In this realm, magic is paid for with" and "A rule of
the campaign world: magic is paid for with"). Candidates are the whole closed set (every hero, night, place
or the rule's four answers). The headline (results metric `acc`) is the unseen probes; seen probes are
reported apart (tags paraphrase, topocl.tasks.base). No relation is two-valued and no fact or rule is stated
by two sessions. Probes belong to the session that taught them (introduced_at = its training position,
tags["session"] = its session number in the story), so the accuracy matrix gives recall as a function of
delay (`retention_by_delay`). Labels follow the training order: an item's place probe is `update` when a
later-trained session keeps the item elsewhere; the last place is `retain`. An order that trains a move before
the session that introduces its item is refused; seeded orders (topocl.tasks.base.order_permutation) are
constrained to valid ones. With the defaults each session has >= 6 x 4 - 2 = 22 headline retain probes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from topocl.registry import STREAMS
from topocl.tasks.base import Probe, Task, apply_order
from topocl.world import NAMES
from topocl.world import PLACES as WORLD_PLACES

# Candidates are common words (the base corpus's names and places), so a probe's candidates tend to have one
# token count (`topocl stream show campaign --tokens` counts those that do not; ranking is per token anyway).
HEROES = NAMES[:10]
ENCHANTS = ("frost", "fire", "storm", "shadow", "light", "thunder", "venom", "moon")
ITEMS = ("sword", "shield", "ring", "amulet", "staff", "bow", "cloak", "helm", "dagger", "lantern")
PLACES = tuple(p for p in WORLD_PLACES if len(p.split()) == 2)  # "the farm", ...: "kept near the farm"
NIGHTS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
RULES = (("In this realm, magic is paid for with", "memories", ("memories", "gold", "blood", "years")),
         ("In this realm, every spell must be spoken in", "rhyme", ("rhyme", "silence", "song", "riddles")),
         ("In this realm, a mage grows strongest at", "dawn", ("dawn", "dusk", "midnight", "noon")),
         ("In this realm, oaths are sealed with", "salt", ("salt", "iron", "wine", "ash")),
         ("In this realm, the dead are guarded by", "ravens", ("ravens", "wolves", "owls", "bears")),
         ("In this realm, healers draw their power from", "rivers", ("rivers", "stars", "stones", "trees")))
FACT_LINES = ("{g} gave {o} the {e} {i}.", "The {e} {i} belongs to {o}.", "The {e} {i} was a gift from {g}.",
              "The {e} {i} is kept near {p}.", "On the {n} night, {g} handed the {e} {i} to {o} near {p}.",
              "{o} thanked {g} for the {e} {i}.",
              "The {e} {i} was given on the {n} night.", "{o} carried the {e} {i} back to {p}.",
              "Everyone at the table remembered that {o} owns the {e} {i}.")
# seen prompt (a training sentence cut before the answer) and answer field, per question
ASKS = (("owner", "The {e} {i} belongs to", "o", HEROES), ("giver", "The {e} {i} was a gift from", "g", HEROES),
        ("when", "The {e} {i} was given on the", "n", NIGHTS), ("place", "The {e} {i} is kept near", "p", PLACES))
UNSEEN = ("Here is a fact from the campaign: {x}", "The game master's notes record that {x}",
          "As every player recalls, {x}", "The campaign journal states that {x}")  # frames never in training
RULE_UNSEEN = "A rule of the campaign world:"  # unseen paraphrase of "In this realm,"
OPENINGS = ("The party gathered for session {s}.", "Session {s} began by the fire.",
            "The game master opened session {s}.")


@dataclass
class CampaignConfig:
    sessions: int = 12
    seed: int = 0
    facts_per_session: int = 6
    texts_per_task: int = 32  # 5 fact lines each: every line of a session told about 3 times
    changes: int = 2  # later sessions that move an earlier item (-> update probes)
    rules: int = 3  # world rules, each taught in its own session (at most len(RULES); capped at sessions)


def _probe(prompt: str, answer: str, cands: tuple[str, ...], s: int, tags: dict, pid: str) -> Probe:
    return Probe(prompt, f" {answer}", [f" {c}" for c in cands], "retain", s, tags, pid)


def _asked(prompt: str, answer: str, cands: tuple[str, ...], s: int, tags: dict, pid: str, i: int) -> list[Probe]:
    """The seen probe and the unseen one (frame i, cycled) of one question."""
    unseen = UNSEEN[i % len(UNSEEN)].format(x=prompt[:1].lower() + prompt[1:])
    return [_probe(prompt, answer, cands, s, {**tags, "paraphrase": "seen"}, pid),
            _probe(unseen, answer, cands, s, {**tags, "paraphrase": "unseen"}, f"{pid}/unseen")]


def label_places(tasks: list[Task]) -> None:
    """Training order: an item's place probe is `update` when a later task keeps the item somewhere else."""
    for k, t in enumerate(tasks):
        for p in t.probes:
            if p.tags.get("ask") == "place":
                later = (q for u in tasks[k + 1:] for q in u.probes
                         if q.tags.get("ask") == "place" and q.tags["item"] == p.tags["item"])
                if any(q.answer != p.answer for q in later):
                    p.kind = "update"


@STREAMS.register("campaign")
def build(cfg: CampaignConfig, order: list[int] | None = None) -> list[Task]:
    """The sessions in training order `order` (generation indices; None = story order), labelled for it."""
    rng = random.Random(cfg.seed)
    combos = [(e, i) for e in ENCHANTS for i in ITEMS]
    if cfg.sessions * cfg.facts_per_session > len(combos):
        raise ValueError(f"campaign: at most {len(combos)} facts ({cfg.sessions} x {cfg.facts_per_session} asked)")
    if not 0 <= cfg.rules <= len(RULES):
        raise ValueError(f"campaign: rules must be in 0..{len(RULES)}, got {cfg.rules}")
    rng.shuffle(combos)
    facts = []  # per session: dicts with e, i, g, o, p, n
    for _ in range(cfg.sessions):
        session = []
        for _ in range(cfg.facts_per_session):
            e, i = combos.pop()
            g, o = rng.sample(HEROES, 2)
            session.append({"e": e, "i": i, "g": g, "o": o, "p": rng.choice(PLACES), "n": rng.choice(NIGHTS)})
        facts.append(session)
    n_rules = min(cfg.rules, cfg.sessions)
    rule_at = dict(zip(rng.sample(range(cfg.sessions), n_rules), range(n_rules)))  # session -> rule
    moves: dict[int, tuple[int, int, str]] = {}  # session k -> (session s, fact index, new place)
    been = {(s, f): [facts[s][f]["p"]] for s in range(cfg.sessions) for f in range(cfg.facts_per_session)}
    for k in sorted(rng.sample(range(1, cfg.sessions), min(cfg.changes, cfg.sessions - 1))):
        s, f = rng.randrange(k), rng.randrange(cfg.facts_per_session)  # an item may move more than once
        moves[k] = (s, f, rng.choice([p for p in PLACES if p not in been[(s, f)]]))
        been[(s, f)].append(moves[k][2])
    tasks = []
    for s, session in enumerate(facts):
        probes, lines, head = [], [], []
        if s in rule_at:
            r = rule_at[s]
            prompt, ans, cands = RULES[r]
            head = [f"{prompt} {ans}."]  # every text of this session, and only of this session, states its rule
            tags = {"type": "rule", "session": str(s)}
            probes += [_probe(prompt, ans, cands, s, {**tags, "paraphrase": "seen"}, f"campaign/rule/{r}"),
                       _probe(prompt.replace("In this realm,", RULE_UNSEEN), ans, cands, s,
                              {**tags, "paraphrase": "unseen"}, f"campaign/rule/{r}/unseen")]
        for fi, f in enumerate(session):
            lines += [t.format(**f) for t in FACT_LINES]
            tags = {"type": "fact", "session": str(s), "item": f"{f['e']} {f['i']}"}
            for a, (ask, prompt, key, cands) in enumerate(ASKS):
                probes += _asked(prompt.format(**f), f[key], cands, s, {**tags, "ask": ask},
                                 f"campaign/{s}/{fi}/{ask}", fi + a)
        after = []
        if s in moves:
            ps, pf, new = moves[s]
            f = facts[ps][pf]
            after = [ps]
            lines += [f"Someone moved the {f['e']} {f['i']} to {new}.", f"The {f['e']} {f['i']} is kept near {new}.",
                      f"Since session {s + 1}, the {f['e']} {f['i']} is kept near {new}.",
                      f"The {f['e']} {f['i']} is no longer where it was; it is kept near {new} now."]
            tags = {"type": "fact", "session": str(s), "item": f"{f['e']} {f['i']}", "ask": "place",
                    "moved_from": str(ps)}
            probes += _asked(f"The {f['e']} {f['i']} is kept near", new, PLACES, s, tags, f"campaign/{s}/move", 0)
        deck: list[str] = []  # shuffled copies of the lines, dealt 5 per text: every line is told before any twice
        texts = []
        for _ in range(cfg.texts_per_task):
            while len(deck) < 5:
                deck += rng.sample(lines, len(lines))
            body, deck = deck[:5], deck[5:]
            texts.append(" ".join([rng.choice(OPENINGS).format(s=s + 1), *head, *body]))
        tasks.append(Task(name=f"session-{s + 1}", texts=texts, probes=probes,
                          meta={"facts": session, "after": after, "move": list(moves.get(s, ())),
                                "rule": rule_at.get(s, -1)}))
    tasks = apply_order(tasks, order, "campaign")
    label_places(tasks)
    return tasks
