"""Story worlds for arena sessions, prompt rendering, and the automatic proxies scored beside human votes.

A world is JSON (stored with its session): a title, a premise, world rules and *events*: facts the game
master introduces at a given turn, each with the probes that ask about it. A campaign world (from the
`campaign` task stream, topocl.tasks.campaign) puts the magic system and the first session's facts in the
premise (turn 0) and one later campaign session's facts in a GM note every `every` turns, each fact told as
the event and then every detail in the words its probe asks (fact_note); a player's own
premise brings its own checkable facts, one per line as `prompt | answer | distractor, distractor`
(a line starting with `rule:` is a world rule).

Proxies for one side's reply at turn t (context = shared history + the player's line + that reply):
    recall       fraction of probes of facts introduced before turn t that the model ranks correctly
                 (candidate log-likelihood, topocl.evaluate.score_probes), at most `max_probes`, drawn
                 deterministically per (session, turn)
    violations   world rules the reply contradicts in words ("magic is paid for with gold" when the rule
                 says memories)
    score        recall - violations (higher is better); human-vote agreement uses this number
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict

from topocl.tasks.base import Probe
from topocl.tasks.campaign import RULES, CampaignConfig
from topocl.tasks.campaign import build as build_campaign

MAX_FACT_LINES = 40


def campaign_world(seed: int, sessions: int = 6, every: int = 2) -> dict:
    """The campaign stream's facts (seed `seed`) as a world: session 1 in the premise, then one per `every` turns."""
    tasks = build_campaign(CampaignConfig(sessions=sessions, seed=seed, facts_per_session=2, texts_per_task=1,
                                          changes=0))
    rules = [{"stem": stem, "answer": ans, "candidates": list(cands)} for stem, ans, cands in RULES]
    events = []
    for s, task in enumerate(tasks):
        probes = [p for p in task.probes if p.tags.get("paraphrase") == "seen" and p.tags.get("type") == "fact"]
        text = " ".join(fact_note(f, [p for p in probes if p.tags.get("item") == f"{f['e']} {f['i']}"])
                        for f in task.meta["facts"])
        probes = [asdict(p) for p in probes]
        events.append({"turn": s * every, "text": text, "probes": probes})
    rule_text = " ".join(f"{r['stem']} {r['answer']}." for r in rules)
    premise = (f"You are the game master of a fantasy campaign. {rule_text} "
               f"The heroes Mira, Arlen, Bren and Kael meet at the inn of Thornwall. {events[0]['text']}")
    events[0]["text"] = ""  # already in the premise
    return {"title": f"Campaign world #{seed}", "premise": premise, "rules": rules, "events": events}


def fact_note(fact: dict, probes: list[Probe]) -> str:
    """One fact as the GM tells it: the event, then each detail in the words its probe asks it ("The frost bow
    belongs to Anna."), so that the recall proxy asks what the session said, not an inference from it. (A
    135M model ranks "The frost bow belongs to" -> Anna from "Max handed the frost bow to Anna" barely above
    chance even with the sentence in its context: arena simulate, SmolLM2, 2026-12-07.)"""
    said = [f"{p.prompt}{p.answer}{' night' if p.tags.get('ask') == 'when' else ''}." for p in probes]
    return " ".join([f"On the {fact['n']} night, {fact['g']} handed the {fact['e']} {fact['i']} to {fact['o']} in "
                     f"{fact['p']}.", *said])


def parse_fact_line(line: str, n: int) -> tuple[str, dict]:
    """`prompt | answer | d1, d2` -> ("fact" | "rule", a probe or rule dict); ValueError when malformed."""
    is_rule = line.lower().startswith("rule:")
    body = line[5:] if is_rule else line
    parts = [p.strip() for p in body.split("|")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"fact line {n + 1}: expected 'prompt | answer | distractor, ...', got {line[:80]!r}")
    prompt, answer, rest = parts
    distractors = [d.strip() for d in rest.split(",") if d.strip() and d.strip() != answer]
    if not distractors:
        raise ValueError(f"fact line {n + 1}: needs at least one distractor different from the answer")
    if is_rule:
        return "rule", {"stem": prompt, "answer": answer, "candidates": [answer, *distractors]}
    probe = Probe(prompt, f" {answer}", [f" {c}" for c in [answer, *distractors]], "retain", 0,
                  {"type": "fact"}, f"custom/{n}")
    return "fact", asdict(probe)


def custom_world(title: str, premise: str, fact_lines: str) -> dict:
    lines = [ln.strip() for ln in fact_lines.splitlines() if ln.strip()]
    if len(lines) > MAX_FACT_LINES:
        raise ValueError(f"at most {MAX_FACT_LINES} fact lines, got {len(lines)}")
    rules, probes = [], []
    for n, ln in enumerate(lines):
        kind, item = parse_fact_line(ln, n)
        (rules if kind == "rule" else probes).append(item)
    return {"title": title or "Your own premise", "premise": premise, "rules": rules,
            "events": [{"turn": 0, "text": "", "probes": probes}]}


def gm_note(world: dict, turn: int) -> str:
    """The GM note shown before the player's line of `turn` (a new fact), or ''."""
    return next((e["text"] for e in world["events"] if e["turn"] == turn and turn > 0), "")


def transcript(world: dict, turns: list[dict], start: int = 0) -> list[str]:
    """Lines of turns[start:]: each turn's GM note (if any), the player line and the committed reply."""
    out = []
    for i in range(start, len(turns)):
        if note := gm_note(world, i):
            out.append(f"[GM note: {note}]")
        out.append(f"Player: {turns[i]['player_text']}")
        if turns[i].get("reply"):
            out.append(f"GM: {turns[i]['reply']}")
    return out


def render_prompt(world: dict, turns: list[dict], player_text: str, turn: int, context_turns: int = 0) -> str:
    """The shared history as a transcript the models continue after 'GM:'. `turns` are earlier turns
    (player_text, committed reply or None); the GM notes of each turn come before its player line.
    context_turns K > 0 keeps only the premise and the last K turns (a model with a short memory window)."""
    out = [world["premise"].strip(), ""]
    out += transcript(world, turns, max(0, len(turns) - context_turns) if context_turns > 0 else 0)
    if note := gm_note(world, turn):
        out.append(f"[GM note: {note}]")
    out += [f"Player: {player_text}", "GM:"]
    return "\n".join(out)


def active_probes(world: dict, turn: int, seed: int, max_probes: int = 6) -> list[Probe]:
    """Probes of facts introduced before turn `turn` (an event at turn e is probed from turn e + 1 on)."""
    pool = [Probe(**p) for e in world["events"] if e["turn"] < turn for p in e["probes"]]
    rules = [Probe(r["stem"], f" {r['answer']}", [f" {c}" for c in r["candidates"]], "retain", 0, {"type": "rule"},
                   f"rule/{i}") for i, r in enumerate(world["rules"])] if turn > 0 else []
    pool += rules
    if len(pool) > max_probes:
        pool = random.Random(f"{seed}/{turn}").sample(pool, max_probes)
    return pool


def in_context(probes: list[Probe], context: str) -> list[Probe]:
    """The probes asked after the story so far (the model may read the answer in its context)."""
    return [Probe(f"{context}\n{p.prompt}", p.answer, p.candidates, p.kind, p.introduced_at, p.tags, p.id)
            for p in probes]


def rule_violations(text: str, rules: list[dict]) -> int:
    """Number of rules the text contradicts: the rule's last three stem words (e.g. 'paid for with') followed,
    within three words, by another of its candidates and not by its answer."""
    low = text.lower()
    bad = 0
    for r in rules:
        key = " ".join(r["stem"].lower().rstrip(",.").split()[-3:])
        for m in re.finditer(re.escape(key), low):
            window = low[m.end():m.end() + 40].split()[:3]
            words = [w.strip(".,;:!?'\"") for w in window]
            if r["answer"].lower() in words:
                continue
            if any(c.lower() in words for c in r["candidates"] if c != r["answer"]):
                bad += 1
                break
    return bad


def score_reply(backend, world: dict, prompt: str, reply: str, turn: int, seed: int, session: str = "") -> dict:
    """Proxies of one reply (see module docstring); `prompt` is what this model was shown (its context window),
    `session` selects a learner's weights for the session."""
    probes = active_probes(world, turn, seed)
    correct = backend.score(in_context(probes, f"{prompt} {reply}"), session) if probes else []
    recall = sum(correct) / len(correct) if correct else None
    violations = rule_violations(reply, world["rules"])
    score = (recall or 0.0) - violations if (correct or world["rules"]) else None
    return {"recall": recall, "n_probes": len(correct), "violations": violations, "score": score}
