"""`campaign` (TRPG long-range memory): a role-play campaign told in sessions, one task per session.

Each session introduces fine-grained facts — who gave whom which item with which enchantment, where it is
kept, on which night — and restates the campaign's stable world rules (its magic system). Probes ask
for a fact's owner, giver, night and place (the place also in an unseen paraphrase); they belong to the
session that introduced the fact (introduced_at and tags["session"]), so the accuracy matrix gives recall
as a function of delay (`retention_by_delay`). `changes` later sessions move an earlier item in-story (an
item may move twice): the item's earlier place probes become kind `update`, the new place is `retain`.
The magic-system probes belong to session 0 and must hold throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from topocl.registry import STREAMS
from topocl.tasks.base import Probe, Task

HEROES = ("Mira", "Arlen", "Bren", "Kael", "Sera", "Doran", "Ilsa", "Tomas", "Nyra", "Oswin")
ENCHANTS = ("frost", "fire", "storm", "shadow", "light", "thunder", "venom", "moon")
ITEMS = ("sword", "shield", "ring", "amulet", "staff", "bow", "cloak", "helm", "dagger", "lantern")
PLACES = ("Thornwall", "Eastmarch", "Greyhollow", "Duskport", "Ravenfield", "Stonebridge", "Mistvale", "Emberfall")
NIGHTS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
RULES = (("In this realm, magic is paid for with", "memories", ("memories", "gold", "blood", "years")),
         ("In this realm, every spell must be spoken in", "rhyme", ("rhyme", "silence", "song", "riddles")),
         ("In this realm, a mage grows strongest at", "dawn", ("dawn", "dusk", "midnight", "noon")))
FACT_LINES = ("{g} gave {o} the {e} {i}.", "The {e} {i} belongs to {o}.", "The {e} {i} was a gift from {g}.",
              "The {e} {i} is kept in {p}.", "On the {n} night, {g} handed the {e} {i} to {o} in {p}.",
              "{o} thanked {g} for the {e} {i}.",
              "The {e} {i} was given on the {n} night.", "{o} carried the {e} {i} back to {p}.",
              "Everyone at the table remembered that {o} owns the {e} {i}.")
RULE_UNSEEN = "A rule of the campaign world:"  # unseen paraphrase of "In this realm,"
OPENINGS = ("The party gathered for session {s}.", "Session {s} began by the fire.",
            "The game master opened session {s}.")


@dataclass
class CampaignConfig:
    sessions: int = 12
    seed: int = 0
    facts_per_session: int = 3
    texts_per_task: int = 16
    changes: int = 2  # later sessions that move an earlier item (-> update probes)


def _probe(prompt: str, answer: str, cands: tuple[str, ...], kind: str, s: int, tags: dict, pid: str) -> Probe:
    """A probe whose paraphrase tag is "seen" unless the tags say "unseen"."""
    return Probe(prompt, f" {answer}", [f" {c}" for c in cands], kind, s, {"paraphrase": "seen", **tags}, pid)


@STREAMS.register("campaign")
def build(cfg: CampaignConfig) -> list[Task]:
    rng = random.Random(cfg.seed)
    combos = [(e, i) for e in ENCHANTS for i in ITEMS]
    if cfg.sessions * cfg.facts_per_session > len(combos):
        raise ValueError(f"campaign: at most {len(combos)} facts ({cfg.sessions} x {cfg.facts_per_session} asked)")
    rng.shuffle(combos)
    facts = []  # per session: dicts with e, i, g, o, p, n
    for _ in range(cfg.sessions):
        session = []
        for _ in range(cfg.facts_per_session):
            e, i = combos.pop()
            g, o = rng.sample(HEROES, 2)
            session.append({"e": e, "i": i, "g": g, "o": o, "p": rng.choice(PLACES), "n": rng.choice(NIGHTS)})
        facts.append(session)
    moves: dict[int, tuple[int, int, str]] = {}  # session k -> (session s, fact index, new place)
    place = {(s, f): facts[s][f]["p"] for s in range(cfg.sessions) for f in range(cfg.facts_per_session)}
    for k in sorted(rng.sample(range(1, cfg.sessions), min(cfg.changes, cfg.sessions - 1))):
        s, f = rng.randrange(k), rng.randrange(cfg.facts_per_session)  # an item may move more than once
        moves[k] = (s, f, rng.choice([p for p in PLACES if p != place[(s, f)]]))
        place[(s, f)] = moves[k][2]
    tasks = []
    place_probes: dict[tuple[int, int], list[Probe]] = {}  # item -> its place probes, in story order
    for s, session in enumerate(facts):
        probes, lines = [], []
        rules = [rule + f" {ans}." for rule, ans, _ in RULES]
        if s == 0:
            for r, (prompt, ans, cands) in enumerate(RULES):
                probes.append(_probe(prompt, ans, cands, "retain", 0, {"type": "rule", "session": "0"},
                                     f"campaign/rule/{r}"))
                probes.append(_probe(prompt.replace("In this realm,", RULE_UNSEEN), ans, cands, "retain", 0,
                                     {"type": "rule", "session": "0", "paraphrase": "unseen"},
                                     f"campaign/rule/{r}/unseen"))
        for fi, f in enumerate(session):
            lines += [t.format(**f) for t in FACT_LINES]
            item = f"The {f['e']} {f['i']}"
            tags = {"type": "fact", "session": str(s), "item": f"{f['e']} {f['i']}"}
            probes.append(_probe(f"{item} belongs to", f["o"], HEROES, "retain", s, {**tags, "ask": "owner"},
                                 f"campaign/{s}/{fi}/owner"))
            probes.append(_probe(f"{item} was a gift from", f["g"], HEROES, "retain", s, {**tags, "ask": "giver"},
                                 f"campaign/{s}/{fi}/giver"))
            probes.append(_probe(f"{item} was given on the", f["n"], NIGHTS, "retain", s, {**tags, "ask": "when"},
                                 f"campaign/{s}/{fi}/when"))
            place_probes[(s, fi)] = [
                _probe(f"{item} is kept in", f["p"], PLACES, "retain", s, {**tags, "ask": "place"},
                       f"campaign/{s}/{fi}/place"),
                _probe(f"Here is a fact from the campaign: the {f['e']} {f['i']} is kept in", f["p"], PLACES,
                       "retain", s, {**tags, "ask": "place", "paraphrase": "unseen"},
                       f"campaign/{s}/{fi}/place/unseen")]
            probes += place_probes[(s, fi)]
        if s in moves:
            ps, pf, new = moves[s]
            f = facts[ps][pf]
            lines += [f"{f['o']} moved the {f['e']} {f['i']} to {new}.", f"The {f['e']} {f['i']} is kept in {new}.",
                      f"Since session {s + 1}, the {f['e']} {f['i']} is kept in {new}.",
                      f"The {f['e']} {f['i']} is no longer where it was; it is kept in {new} now."]
            tags = {"type": "fact", "session": str(s), "item": f"{f['e']} {f['i']}", "ask": "place",
                    "moved_from": str(ps)}
            for q in place_probes[(ps, pf)]:  # the item's earlier place is deliberately contradicted
                q.kind = "update"
            place_probes[(ps, pf)] = [
                _probe(f"The {f['e']} {f['i']} is kept in", new, PLACES, "retain", s, tags, f"campaign/{s}/move"),
                _probe(f"Here is a fact from the campaign: the {f['e']} {f['i']} is kept in", new, PLACES, "retain",
                       s, {**tags, "paraphrase": "unseen"}, f"campaign/{s}/move/unseen")]
            probes += place_probes[(ps, pf)]
        texts = []
        for n in range(cfg.texts_per_task):  # every text restates one world rule, in turn
            body = rng.sample(lines, min(len(lines), 5))
            texts.append(" ".join([rng.choice(OPENINGS).format(s=s + 1), rules[n % len(rules)], *body]))
        tasks.append(Task(name=f"session-{s + 1}", texts=texts, probes=probes, meta={"facts": session}))
    return tasks
