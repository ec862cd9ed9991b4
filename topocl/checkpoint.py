"""Checkpoints: safetensors weights + safetensors optimizer/RNG tensors + JSON state, written atomically.

    checkpoints/
      step_00000200/  model.safetensors  optim.safetensors  state.json
      LATEST          ("step_00000200")

A checkpoint is written into a hidden temp directory, fsynced, then renamed into place; LATEST is
replaced with os.replace. A crash at any moment leaves the previous checkpoint loadable: a directory
without state.json (written last) is never considered complete. A checkpoint holding NaN/inf is never
written (NonFiniteCheckpoint; LATEST keeps pointing to the last good one).

state.json is the manifest: it records the size and SHA-256 of both safetensors files, and loading
verifies them first, so a truncated or bit-rotted file is refused (CheckpointError naming the file and
the fix) before any weight is touched. `load_latest` (resume) then falls back to the previous intact
checkpoint, with a CheckpointWarning saying so. Checkpoints written before the manifest load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "LATEST"


FILES = ("model.safetensors", "optim.safetensors")


class CheckpointError(FileNotFoundError):
    """A missing, unreadable or corrupt checkpoint; the message names the file and the fix."""


class NonFiniteCheckpoint(RuntimeError):
    """The weights (or optimizer state) hold NaN/inf: the checkpoint was not written."""


class CheckpointWarning(UserWarning):
    """An unusable checkpoint was skipped for the previous intact one."""


def _fix(ckpt: Path) -> str:
    return (f"delete {ckpt} to resume from the previous checkpoint, or start again in a new out_dir "
            "(the file is damaged: disk error, full disk or an interrupted copy)")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteCheckpoint(f"'{k}' holds NaN/inf: {where} was not written")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state keyed by parameter name (robust to regrouping), and the groups' JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g in opt.param_groups:
        for name, p in zip(g["names"], g["params"]):
            for k, v in opt.state.get(p, {}).items():
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
        groups.append({k: v for k, v in g.items() if k != "params"})
    return tensors, groups


def model_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor stored once (tied embeddings / lm_head of HF models), and
    {alias: stored name} for the others."""
    weights: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in unwrap(model).state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        weights[k] = v.detach().cpu().contiguous()
    return weights, tied


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model.safetensors as a full state dict (tied aliases filled in)."""
    path = Path(path)
    weights = load_file(path)
    with safe_open(path, "pt") as f:
        tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    weights.update({alias: weights[name] for alias, name in tied.items()})
    return weights


def save_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer | None,
                    state: dict, keep: int = 2, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` complete checkpoints. `tensors` are
    extra named tensors (e.g. a strategy's memory) returned by `load_tensors`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    weights, tied = model_weights(model)
    extra: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    extra.update({f"extra::{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    if torch.cuda.is_available():
        extra["rng.cuda"] = torch.cuda.get_rng_state()
    groups: list[dict] = []
    if opt is not None:
        tensors, groups = _optim_tensors(opt)
        extra.update({f"optim::{k}": v for k, v in tensors.items()})
    prev = latest_checkpoint(ckpt_dir)
    _check_finite({**weights, **extra}, f"checkpoint {final} ({LATEST} still points to "
                  f"{prev.name if prev else 'no checkpoint'})")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, tmp / "model.safetensors", metadata={"tied": json.dumps(tied)})
    save_file(extra, tmp / "optim.safetensors")
    files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}
    write_json_atomic(tmp / "state.json", {**state, "step": step, "param_groups": groups,
                                           "files": files})  # last = complete
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    tmp_latest = ckpt_dir / f".{LATEST}.tmp"
    tmp_latest.write_text(name)
    os.replace(tmp_latest, ckpt_dir / LATEST)
    for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / "state.json").is_file())


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        cand = ckpt_dir / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def read_state(path: str | Path) -> dict:
    """A checkpoint's state.json (its manifest); CheckpointError naming the file when it is unreadable."""
    path = Path(path)
    f = path / "state.json"
    if not f.is_file():
        raise CheckpointError(f"no complete checkpoint at {path} (state.json missing)")
    try:
        state = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); {_fix(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object; {_fix(path)}")
    return state


def verify_checkpoint(path: str | Path) -> dict:
    """The state of checkpoint `path` after checking every file against its manifest (size, SHA-256)."""
    path = Path(path)
    state = read_state(path)
    for name, info in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; {_fix(path)}")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {info['bytes']} (truncated?); {_fix(path)}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest (the file is corrupt); {_fix(path)}")
    return state


def _read(f: Path, fn, ckpt: Path):
    try:
        return fn(f)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e}); {_fix(ckpt)}") from None


def load_checkpoint(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load weights (strict) and, if given, optimizer state; returns the JSON state. The files are verified
    against the manifest before anything is loaded."""
    path = Path(path)
    state = verify_checkpoint(path)
    weights = _read(path / "model.safetensors", read_weights, path)
    extra = _read(path / "optim.safetensors", load_file, path)
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if opt is not None:
        by_name = {n: p for g in opt.param_groups for n, p in zip(g["names"], g["params"])}
        opt.state.clear()
        for key, v in extra.items():
            if not key.startswith("optim::"):
                continue
            name, k = key[len("optim::"):].rsplit("::", 1)
            if name in by_name:  # a role frozen now has no state to restore
                p = by_name[name]
                opt.state.setdefault(p, {})[k] = v.to(p.device) if k != "step" else v
    if restore_rng:
        torch.set_rng_state(extra["rng.torch"])
        if "rng.cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra["rng.cuda"])
    return state


def load_latest(ckpt_dir: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                restore_rng: bool = True) -> tuple[Path, dict] | None:
    """Resume: load the newest intact checkpoint (LATEST's, else older ones, newest first), warning for each
    unusable one skipped. None when there is no complete checkpoint; CheckpointError when none is intact."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return None
    older = sorted((c for c in complete_checkpoints(ckpt_dir) if c.name < latest.name), reverse=True)
    errors = []
    for ck in [latest, *older]:
        try:
            state = load_checkpoint(ck, model, opt, restore_rng)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"resuming from the previous intact checkpoint {ck} because: {'; and '.join(errors)}",
                          CheckpointWarning, stacklevel=2)
        return ck, state
    raise CheckpointError(f"no intact checkpoint under {ckpt_dir}: {'; and '.join(errors)}")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors saved with `save_checkpoint(..., tensors=...)`."""
    extra = _read(Path(path) / "optim.safetensors", load_file, Path(path))
    return {k[len("extra::"):]: v for k, v in extra.items() if k.startswith("extra::")}
