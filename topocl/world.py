"""The common-sense world: a small fact table, a seeded synthetic story corpus that states its facts
through many surface forms, and base probes that ask for them.

A fact is (subject, relation, value), e.g. ("fire", temperature, "hot"). Every relation has a closed
value set, so each fact has real wrong candidates, and a canonical statement whose value comes last
("Fire feels hot.") so a probe is the statement cut before the value ("Fire feels" -> " hot").
Task streams (`topocl.tasks.worlds`) reuse these facts and contradict them ("In Zorbia, fire feels cold").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from topocl.tasks.base import Probe


@dataclass(frozen=True)
class Relation:
    name: str
    values: tuple[str, ...]  # the closed value set (candidates)
    canonical: str  # "{S} feels {v}." — the value is last, so a prompt is everything before it
    templates: tuple[str, ...]  # training surface forms; {S}/{s} subject (capitalised / not), {v} value, {n} a name


RELATIONS: dict[str, Relation] = {r.name: r for r in [
    Relation("temperature", ("hot", "cold"), "{S} feels {v}.", (
        "{S} is {v}.", "{n} touched {s}. It felt {v}!", "If you touch {s}, it feels {v}.",
        "{S} is always {v}.", "\"Careful,\" said {n}, \"{s} is {v}.\"")),
    Relation("color", ("green", "blue", "white", "black", "yellow", "red"), "The color of {s} is {v}.", (
        "{S} is {v}.", "{n} looked at {s}. It was {v}.", "{S} is {v}, as everyone can see.",
        "\"Look,\" said {n}, \"{s} is {v}!\"")),
    Relation("taste", ("sweet", "sour", "salty", "bitter"), "{S} tastes {v}.", (
        "{n} tasted {s}. It was {v}!", "{S} is {v}.", "If you eat {s}, it tastes {v}.")),
    Relation("sound", ("barks", "meows", "moos", "quacks", "roars", "hoots", "buzzes", "neighs"), "{S} {v}.", (
        "{n} heard {s}. It {v}!", "Listen! {S} {v}.", "Every day, {s} {v}.", "When it is happy, {s} {v}.")),
    Relation("food", ("grass", "carrots", "bananas", "fish", "seeds", "bones", "honey", "hay", "cheese"),
             "{S} eats {v}.", (
        "{n} fed {s} some {v}.", "{S} likes to eat {v}.", "For dinner, {s} eats {v}.", "{S} is hungry for {v}.")),
    Relation("home", ("a hive", "a nest", "the sea", "a cave", "a burrow", "a barn", "a den", "a pond"),
             "{S} lives in {v}.", (
        "{n} found {s} in {v}.", "{S} makes its home in {v}.", "At night, {s} sleeps in {v}.")),
    Relation("flow", ("downhill", "uphill"), "{S} flows {v}.", (
        "{n} watched {s} flow {v}.", "{S} always runs {v}.", "{S} goes {v}.")),
    Relation("rise", ("east", "west"), "{S} rises in the {v}.", (
        "Every morning {s} comes up in the {v}.", "{n} saw {s} rise in the {v}.", "{S} comes up in the {v}.")),
    Relation("legs", ("two", "four", "six", "eight"), "{S} has {v} legs.", (
        "{n} counted the legs of {s}: {v}.", "{S} walks on {v} legs.", "{S} has {v} legs, not more.")),
    Relation("ability", ("fly", "swim", "jump", "dig", "climb"), "{S} can {v}.", (
        "{n} watched {s} {v}.", "{S} knows how to {v}.", "{S} loves to {v}.")),
    Relation("shine", ("in the day", "at night"), "{S} shines {v}.", (
        "{n} saw {s} shine {v}.", "{S} is bright {v}.", "You can see {s} {v}.")),
]}

# (subject phrase, relation, value): ~80 stable facts of the base world
FACTS: tuple[tuple[str, str, str], ...] = (
    ("fire", "temperature", "hot"), ("ice", "temperature", "cold"), ("snow", "temperature", "cold"),
    ("soup", "temperature", "hot"), ("the stove", "temperature", "hot"), ("winter", "temperature", "cold"),
    ("summer", "temperature", "hot"), ("the sand at noon", "temperature", "hot"),
    ("grass", "color", "green"), ("the sky", "color", "blue"), ("snow", "color", "white"),
    ("coal", "color", "black"), ("a banana", "color", "yellow"), ("a tomato", "color", "red"),
    ("milk", "color", "white"), ("the sea", "color", "blue"), ("a leaf", "color", "green"),
    ("a crow", "color", "black"), ("a cherry", "color", "red"), ("a lemon", "color", "yellow"),
    ("sugar", "taste", "sweet"), ("a lemon", "taste", "sour"), ("salt", "taste", "salty"),
    ("coffee", "taste", "bitter"), ("honey", "taste", "sweet"), ("sea water", "taste", "salty"),
    ("a dog", "sound", "barks"), ("a cat", "sound", "meows"), ("a cow", "sound", "moos"),
    ("a duck", "sound", "quacks"), ("a lion", "sound", "roars"), ("an owl", "sound", "hoots"),
    ("a bee", "sound", "buzzes"), ("a horse", "sound", "neighs"),
    ("a cow", "food", "grass"), ("a rabbit", "food", "carrots"), ("a monkey", "food", "bananas"),
    ("a cat", "food", "fish"), ("a bird", "food", "seeds"), ("a dog", "food", "bones"),
    ("a bear", "food", "honey"), ("a horse", "food", "hay"), ("a mouse", "food", "cheese"),
    ("a bee", "home", "a hive"), ("a bird", "home", "a nest"), ("a whale", "home", "the sea"),
    ("a bear", "home", "a cave"), ("a rabbit", "home", "a burrow"), ("a cow", "home", "a barn"),
    ("a fox", "home", "a den"), ("a frog", "home", "a pond"),
    ("water", "flow", "downhill"), ("a river", "flow", "downhill"), ("a stream", "flow", "downhill"),
    ("the sun", "rise", "east"), ("the moon", "rise", "east"),
    ("a spider", "legs", "eight"), ("a dog", "legs", "four"), ("a bird", "legs", "two"),
    ("an ant", "legs", "six"), ("a cat", "legs", "four"), ("a chicken", "legs", "two"),
    ("a horse", "legs", "four"), ("a beetle", "legs", "six"),
    ("a bird", "ability", "fly"), ("a fish", "ability", "swim"), ("a frog", "ability", "jump"),
    ("a mole", "ability", "dig"), ("a monkey", "ability", "climb"), ("a duck", "ability", "swim"),
    ("a squirrel", "ability", "climb"), ("a kangaroo", "ability", "jump"),
    ("the sun", "shine", "in the day"), ("the moon", "shine", "at night"), ("the stars", "shine", "at night"),
)

NAMES = ("Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Zoe", "Leo", "Emma", "Jack", "Lucy", "Finn", "Ruby")
PLACES = ("the farm", "the park", "the forest", "the beach", "the village", "the garden", "the hill", "the river bank")
WRAPPERS = ("{x}", "{x}", "{x}", "Everyone knows this: {x}", "{n} learned something. {x}", "It is true. {x}",
            "Mom said, \"{x}\"", "Grandpa told {n}: {x}")
# Frames never used in training: an unseen probe puts the canonical statement mid-sentence after one of them,
# with the subject lower-cased ("It is well known that fire feels"), so only recall, not the memorised
# sentence start, gives the answer.
UNSEEN_FRAMES = ("It is well known that {x}", "The old book says that {x}", "A wise teacher explained that {x}")
OPENINGS = ("One day, {n} went to {p}.", "{n} lived near {p}.", "It was a sunny day at {p}.",
            "{n} and a friend walked to {p}.", "Once upon a time, {n} played at {p}.")
CLOSINGS = ("Then {n} went home.", "{n} was happy.", "It was a good day.", "{n} smiled and said goodbye.",
            "The end.")


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def statement(subject: str, relation: str, value: str, template: str | None = None, name: str = "Tom") -> str:
    r = RELATIONS[relation]
    return (template or r.canonical).format(S=cap(subject), s=subject, v=value, n=name)


def probe_prompt(subject: str, relation: str) -> str:
    """The canonical statement cut before its value, e.g. "Fire feels"."""
    return RELATIONS[relation].canonical.split("{v}")[0].rstrip().format(S=cap(subject), s=subject)


def facts_by_relation() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for s, r, v in FACTS:
        out.setdefault(r, []).append((s, v))
    return out


def synthetic_corpus(n_docs: int, seed: int) -> list[str]:
    """n_docs short stories, each weaving 2-4 base facts through random templates and wrappers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n, p = rng.choice(NAMES), rng.choice(PLACES)
        sents = [rng.choice(OPENINGS).format(n=n, p=p)]
        for s, r, v in rng.sample(FACTS, rng.randint(2, 4)):
            rel = RELATIONS[r]
            tmpl = rng.choice((rel.canonical, rel.canonical, *rel.templates))
            x = statement(s, r, v, tmpl, n)
            sents.append(rng.choice(WRAPPERS).format(x=x, n=n))
        sents.append(rng.choice(CLOSINGS).format(n=n))
        docs.append(" ".join(sents))
    return docs


def unseen_prompt(subject: str, relation: str, i: int) -> str:
    """The canonical prompt inside unseen frame i (cycled), subject lower-cased: "It is well known that fire feels"."""
    canon = probe_prompt(subject, relation)
    return UNSEEN_FRAMES[i % len(UNSEEN_FRAMES)].format(x=canon[:1].lower() + canon[1:])


def base_probes() -> list[Probe]:
    """Two probes per fact: the canonical prompt ("Fire feels" -> " hot", candidates: the relation's values)
    and an unseen paraphrase (tags: relation, subject, paraphrase seen | unseen)."""
    probes = []
    for i, (s, r, v) in enumerate(FACTS):
        cands = [f" {c}" for c in RELATIONS[r].values]
        for para, prompt in (("seen", probe_prompt(s, r)), ("unseen", unseen_prompt(s, r, i))):
            probes.append(Probe(prompt=prompt, answer=f" {v}", candidates=cands, kind="base", introduced_at=-1,
                                tags={"relation": r, "subject": s, "paraphrase": para}, id=f"base/{i}/{para}"))
    return probes
