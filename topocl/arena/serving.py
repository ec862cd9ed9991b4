"""Model serving for the arena: a models YAML -> backends that write replies and score probes.

    models:
      - name: dense-base            # shown only after a session ends
        kind: topocl                # topocl (a TopoCL run directory) | hf (a Hugging Face model directory)
        path: runs/pretrain/tiny-dense
        checkpoint: ""              # topocl only: a checkpoint directory; "" = the newest
        max_new_tokens: 64
        temperature: 0.8            # 0 = greedy
        top_p: 0.95                 # hf only
      - name: scripted-demo
        kind: scripted              # canned replies, no weights (demos, load tests)

Every backend answers `generate(prompt, seed)` (the reply text, cut at the next "Player:" line) and
`score(probes)` (candidate-ranking correctness per probe, by topocl.evaluate.score_probes). A backend
loads its weights on first use and serialises its own calls (one lock per model).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from topocl.config import ConfigError, _convert, _fields
from topocl.tasks.base import Probe

KINDS = ("topocl", "hf", "scripted")


@dataclass
class ModelSpec:
    name: str
    kind: str
    path: str = ""
    checkpoint: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    device: str = "cpu"
    style: str = "keeper"  # scripted only: keeper (repeats the story's latest fact) | forgetter

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} not in {KINDS}")
        if self.kind != "scripted" and not self.path:
            raise ValueError(f"model {self.name!r}: kind {self.kind} needs a path")
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"model {self.name!r}: max_new_tokens {self.max_new_tokens} not in 1..2048")


def load_specs(path: str | Path) -> list[ModelSpec]:
    """Model specs of a models YAML (a list under `models:`); names must be unique, at least two models."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    rows = data.get("models") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list under 'models:'")
    specs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "name" not in row or "kind" not in row:
            raise ValueError(f"{path}: every model needs a name and a kind, got {row!r}")
        spec = _spec(row, f"{path}: models[{i}]")
        if spec.path and not Path(spec.path).is_absolute():
            spec.path = str((path.parent / spec.path).resolve())
        specs.append(spec)
    return check_specs(specs, str(path))


def _spec(row: dict, source: str) -> ModelSpec:
    """A ModelSpec from one YAML row: unknown keys and wrong types are ConfigErrors naming the valid keys."""
    fields = _fields(ModelSpec)
    unknown = sorted(set(map(str, row)) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(fields)}")
    return ModelSpec(**{k: _convert(v, fields[k], k, source) for k, v in row.items()})


def check_specs(specs: list[ModelSpec], source: str = "models") -> list[ModelSpec]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: model names must be unique, got {names}")
    if len(specs) < 2:
        raise ValueError(f"{source}: the arena pairs two models, got {len(specs)}")
    return specs


def demo_specs() -> list[ModelSpec]:
    """Two scripted models: one keeps the story's facts, one forgets them (what `serve` uses without --models)."""
    return [ModelSpec("scripted-keeper", "scripted", style="keeper"),
            ModelSpec("scripted-forgetter", "scripted", style="forgetter")]


def clean_reply(text: str) -> str:
    """The reply up to the model's next 'Player:' line (models trained on transcripts keep going)."""
    for stop in ("\nPlayer:", "Player:", "\n\n\n"):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text.strip() or "(no reply)"


class Backend:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()

    def generate(self, prompt: str, seed: int) -> str:
        raise NotImplementedError

    def score(self, probes: list[Probe]) -> list[bool]:
        raise NotImplementedError


class ScriptedBackend(Backend):
    """No weights: `keeper` repeats the story's newest GM note, `forgetter` ignores it; scoring says so too."""

    def generate(self, prompt: str, seed: int) -> str:
        player = prompt.rsplit("Player:", 1)[-1].split("\nGM:", 1)[0].strip()
        if self.spec.style == "keeper":
            notes = [ln for ln in prompt.splitlines() if ln.startswith("[GM note:")]
            recall = f" As the table recalls: {notes[-1][10:-1]}" if notes else ""
            return f"The game master nods at '{player[:60]}'.{recall} The road winds on (take {seed % 7})."
        return f"Something happens after '{player[:60]}'. Nobody remembers much (take {seed % 5})."

    def score(self, probes: list[Probe]) -> list[bool]:
        return [self.spec.style == "keeper"] * len(probes)


class TopoCLBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model = self.tok = None

    def _load(self) -> None:
        if self.model is None:
            from topocl.pretrain import load_run

            self.model, self.tok, _ = load_run(self.spec.path, self.spec.device, self.spec.checkpoint or None)

    def generate(self, prompt: str, seed: int) -> str:
        import torch

        with self.lock:
            self._load()
            ctx = self.model.cfg.max_seq_len
            ids = [self.tok.bos_id, *self.tok.encode(prompt)][-ctx:]
            gen = torch.Generator(device=self.spec.device).manual_seed(seed)
            idx = torch.tensor([ids], device=self.spec.device)
            out = self.model.generate(idx, self.spec.max_new_tokens, temperature=self.spec.temperature,
                                      stop_id=self.tok.bos_id, generator=gen)
            return clean_reply(self.tok.decode(out[0, len(ids):].tolist()))

    def score(self, probes: list[Probe]) -> list[bool]:
        from topocl.evaluate import score_probes

        with self.lock:
            self._load()
            return [s.correct for s in score_probes(self.model, self.tok, probes, exact_match=False)]


class HFBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model = self.tok = None

    def _load(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.spec.path)
            self.model = AutoModelForCausalLM.from_pretrained(self.spec.path).to(self.spec.device).eval()

    def generate(self, prompt: str, seed: int) -> str:
        import torch

        with self.lock, HF_RNG_LOCK:  # HF sampling draws from the global RNG
            self._load()
            ctx = getattr(self.model.config, "max_position_embeddings", 2048) - self.spec.max_new_tokens
            ids = self.tok.encode(prompt, add_special_tokens=True)[-max(1, ctx):]
            torch.manual_seed(seed)
            sample = self.spec.temperature > 0
            kw = {"do_sample": True, "temperature": self.spec.temperature, "top_p": self.spec.top_p} if sample else {
                "do_sample": False}
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids], device=self.spec.device),
                                          attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                    device=self.spec.device),
                                          max_new_tokens=self.spec.max_new_tokens, pad_token_id=pad, **kw)
            return clean_reply(self.tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))

    def score(self, probes: list[Probe]) -> list[bool]:
        from topocl.evaluate import score_probes

        with self.lock:
            self._load()
            return [s.correct for s in score_probes(self.model, self.tok, probes, exact_match=False)]


HF_RNG_LOCK = threading.Lock()
BACKENDS = {"topocl": TopoCLBackend, "hf": HFBackend, "scripted": ScriptedBackend}


class ModelPool:
    """Backends by name, loaded lazily; `pair` runs two generations concurrently."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.specs = {s.name: s for s in check_specs(specs)}
        self.backends = {s.name: BACKENDS[s.kind](s) for s in specs}
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="arena-gen")

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def pair(self, a: str, b: str, prompt: str, seed: int) -> tuple[str, str, float, float]:
        """Replies of models a and b to the same prompt (both finished before returning) and their ms."""
        import time

        def timed(name: str) -> tuple[str, float]:
            t0 = time.perf_counter()
            text = self.backends[name].generate(prompt, seed)
            return text, 1000.0 * (time.perf_counter() - t0)

        fa, fb = self.pool.submit(timed, a), self.pool.submit(timed, b)
        (ra, ma), (rb, mb) = fa.result(), fb.result()
        return ra, rb, ma, mb
