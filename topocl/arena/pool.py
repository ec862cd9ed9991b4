"""The arena's model pool: the backends of a models YAML by name (topocl.arena.serving), loaded lazily, with
their learners' background workers (topocl.arena.learner), and `pair`, two generations run concurrently."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from topocl.arena.serving import Backend, HFBackend, ModelSpec, ScriptedBackend, TopoCLBackend, check_specs


def _learner(spec: ModelSpec) -> Backend:
    from topocl.arena.learner import LearnerBackend

    return LearnerBackend(spec)


BACKENDS = {"topocl": TopoCLBackend, "hf": HFBackend, "scripted": ScriptedBackend, "learner": _learner}


@dataclass
class Reply:
    text: str
    ms: float  # generation time
    step: int  # learning step of the weights that wrote it (0: never trained)


class ModelPool:
    """Backends by name, loaded lazily; `pair` runs two generations concurrently. Learners (kind learner)
    learn in background workers once `attach` gave them a state directory and a way to read a story."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.specs = {s.name: s for s in check_specs(specs)}
        self.backends = {s.name: BACKENDS[s.kind](s) for s in specs}
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="arena-gen")

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def learners(self) -> dict:
        return {n: b for n, b in self.backends.items() if self.specs[n].kind == "learner"}

    def attach(self, state_dir: str | Path, story, on_round) -> None:
        """Start the learners' workers: per-session state under `state_dir`; `story(session)` gives
        (world, seed, voted turns) of an open session or None; `on_round(session, model, info)` logs a round."""
        for b in self.learners.values():
            b.attach(Path(state_dir), story, on_round)

    def learn(self, session: str, models: tuple[str, ...]) -> None:
        """Queue a catch-up of `session` on those of `models` that learn (returns at once)."""
        for m in models:
            if m in self.learners:
                self.learners[m].enqueue(session)

    def end(self, session: str) -> None:
        """The session ended: learners drop its queued rounds and delete its state (memory and disk)."""
        for b in self.learners.values():
            b.end(session)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """True once every learner's queue is empty and no round runs (tests, simulate)."""
        return all(b.wait_idle(timeout) for b in self.learners.values())

    def close(self) -> None:
        for b in self.learners.values():
            b.close()

    def pair(self, a: str, b: str, prompts: tuple[str, str], seed: int, session: str = "") -> tuple[Reply, Reply]:
        """Replies of models a and b to their prompts (both finished before returning)."""
        def timed(name: str, prompt: str) -> Reply:
            t0 = time.perf_counter()
            text, step = self.backends[name].reply(prompt, seed, session)
            return Reply(text, 1000.0 * (time.perf_counter() - t0), step)

        fa, fb = self.pool.submit(timed, a, prompts[0]), self.pool.submit(timed, b, prompts[1])
        return fa.result(), fb.result()
