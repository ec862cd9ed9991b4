"""Config = dataclasses + YAML + `a.b=c` overrides, with strict errors.

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny-dense.yaml", ["train.lr=3e-4"])

Every YAML key and every override must name a field; values are converted by the field's type
(`lr=3e-4` is a float, `resume=true` a bool). Errors name the key, where it came from and the valid
keys. A YAML file may start with `include: other.yaml` (relative to itself) to inherit from another.
Loaded values are then checked against BOUNDS (train.steps=-5 is an error naming train.steps).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass schema."""


# ----------------------------------------------------------------------------- model


@dataclass
class NSAConfig:
    """Native Sparse Attention sizes. Defaults = the research note's T=1024 row (§4: the paper's ratios scaled
    down so the model is really sparse at our lengths); the tiny presets scale them further for T=128."""

    cmp_block: int = 16  # l: compression block length
    cmp_stride: int = 8  # d: compression stride
    sel_block: int = 32  # l': selection block length
    n_sel: int = 8  # n: selected blocks per query, including forced initial + local
    n_init: int = 1  # forced initial blocks
    n_local: int = 2  # forced most-recent blocks
    window: int = 128  # w: sliding window
    phi: str = "mlp"  # compression φ: mlp | mean
    gate_init: str = "window"  # window (bias -2/-2/+2, SWA-dominated start) | neutral (bias 0)
    impl: str = "auto"  # mask (reference, [T, T] masks) | block (query blocks x visible keys, fused SDPA)
    # | gather (selected blocks gathered, window unfolded) | flex (flex_attention block masks)
    # | auto (flex on CUDA; on CPU block below T = 4096, gather from there)


@dataclass
class DSAConfig:
    """DeepSeek Sparse Attention (lightning indexer + shared top-k tokens). Defaults = the research note's
    T=1024 row (k = 12.5% of T, 4 indexer heads of 64 dims, 32 with RoPE)."""

    topk: int = 128  # tokens kept per query
    index_heads: int = 4  # H_I
    index_dim: int = 64  # d_I
    index_rope_dim: int = 32  # first dims of d_I that get (NeoX) RoPE
    shared_heads: int = 0  # heads that stay dense (0 = pure V3.2 DSA)
    phase: str = "sparse"  # warmup (dense attention, the indexer learns by the dense KL) | sparse
    warmup_steps: int = 0  # two-stage recipe: the first N pretraining steps in phase warmup, then `phase`
    warmup_trains: str = "indexer"  # what trains during those steps: indexer (DeepSeek) | all (from-scratch)
    kl_coeff: float = 1.0  # weight of the indexer KL in the total loss (indexer inputs are detached)
    kl_support: str = "sparse"  # sparse (Eq. 4, Megatron masking) | dense (Eq. 3)
    impl: str = "auto"  # mask (reference, [T, T] masks) | block (query blocks x visible keys, fused SDPA)
    # | gather (sparse phase: top-k keys gathered per query) | auto (the faster of block / gather for the size)


@dataclass
class SplitConfig:
    """Group A heads dense, group B heads keep only the top-k of their own causal scores."""

    sparse_kv_groups: int = -1  # KV groups (with their query heads) in group B; -1 = half
    topk: int = 0  # keys kept per query in group B; 0 = use topk_frac
    topk_frac: float = 0.1  # fraction of the causal prefix kept (at least 1 key)
    impl: str = "auto"  # mask (reference) | block (query blocks x visible keys, fused SDPA) | flex (group B
    # through flex_attention) | auto (flex on CUDA, else block)


@dataclass
class MoEConfig:
    """DeepSeekMoE-style FFN: shared expert(s) + top-k routed experts."""

    n_shared: int = 1
    n_routed: int = 4
    topk: int = 2
    d_expert: int = 0  # 0 = d_ff / (n_shared + topk), so active FLOPs match the dense MLP
    balance_coeff: float = 0.01
    impl: str = "dispatch"  # dispatch (each expert runs on its own tokens) | dense (reference: every token)


@dataclass
class KWTAConfig:
    """k-winners-take-all FFN (`kwta`) and the two-system FFN (`dual`), topocl/kwta.py."""

    rho: float = 1.0  # active fraction of the hidden units (dual: of the fast pathway); 1.0 = dense
    grad: str = "masked"  # masked (no gradient through losing units) | straight_through (the dense gradient)
    slow_rho: float = 1.0  # dual: active fraction of the slow pathway
    fast_frac: float = 0.5  # dual: share of the d_ff hidden units that form the fast pathway


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = take it from the tokenizer
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 0  # 0 = d_model // n_head
    d_ff: int = 0  # 0 = SwiGLU default, 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention: str = "dense"  # registry name: dense | nsa | dsa | split
    ffn: str = "mlp"  # registry name: mlp | moe | kwta | dual
    nsa: NSAConfig = field(default_factory=NSAConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    kwta: KWTAConfig = field(default_factory=KWTAConfig)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff(self) -> int:
        return self.d_ff or 32 * -(-(8 * self.d_model // 3) // 32)


# ----------------------------------------------------------------------------- data / train


@dataclass
class DataConfig:
    corpus: str = "synthetic"  # "synthetic" or a local path (file or directory of .txt/.jsonl/.parquet)
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"  # JSONL / parquet column holding the document
    synthetic_docs: int = 20000  # documents in the synthetic common-sense corpus
    max_docs: int = 0  # 0 = all documents of a local corpus
    val_fraction: float = 0.05  # documents held out for validation
    vocab_size: int = 2048  # byte-level BPE vocabulary
    seq_len: int = 128  # tokens per packed training sequence
    tokenizer: str = ""  # path to an existing tokenizer.json; "" = train one on the training docs


@dataclass
class RolePolicy:
    """Optimizer policy for one parameter role (ACFT is a set of these)."""

    lr_scale: float = 1.0  # multiplies the scheduled LR; 0 = frozen (requires_grad False, no optimizer state)
    weight_decay: float = -1.0  # -1 = train.weight_decay (0 for the `norm` role)
    anchor: float = 0.0  # EMA anchoring toward the values at task start, per step: p += anchor * (p0 - p)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch in sequences (split across ranks, then micro-batches)
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    compile: bool = False
    roles: dict[str, RolePolicy] = field(default_factory=dict)  # role -> policy; roles not named use defaults


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    resume: bool = False
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    samples: int = 4  # greedy samples written at the end
    probe: bool = True  # score base probes at the end (synthetic corpus only)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert `value` (from YAML or a `k=v` string) to field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {tp} ({source})")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({source})")
        items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({source})")
        _, val_tp = typing.get_args(tp) or (str, Any)
        if dataclasses.is_dataclass(val_tp):
            out = {}
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    out[str(k)] = v
                    continue
                if not isinstance(v, dict):
                    raise ConfigError(f"{key}.{k}: expected a mapping of {_type_name(val_tp)} fields ({source})")
                out[str(k)] = child = val_tp()
                for kk, vv in v.items():
                    _set(child, [str(kk)], vv, source, f"{key}.{k}.")
            return out
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r} ({source})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r} ({source})")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an int, got {value!r} ({source})")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r} ({source})")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r} ({source})")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r} ({source})")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)} ({source})")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(obj: Any, path: list[str], value: Any, source: str, prefix: str = "") -> None:
    """Set obj.<path> = value (converted), descending into nested dataclasses."""
    name, rest = path[0], path[1:]
    fields = _fields(type(obj))
    full = f"{prefix}{name}"
    if name not in fields:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown key '{full}' ({source}); valid keys at {where}: {', '.join(sorted(fields))}"
        )
    tp = fields[name]
    if dataclasses.is_dataclass(tp):
        child = getattr(obj, name)
        if rest:
            _set(child, rest, value, source, f"{full}.")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of {_type_name(tp)} fields, got {value!r} ({source})")
        for k, v in value.items():
            _set(child, [str(k)], v, source, f"{full}.")
        return
    if rest and typing.get_origin(tp) is dict:
        # mapping keys may contain dots (role names like attn.cmp): roles.attn.cmp.lr_scale=0
        _, val_tp = typing.get_args(tp)
        mapping = getattr(obj, name)
        if dataclasses.is_dataclass(val_tp):
            if len(rest) < 2:
                raise ConfigError(f"{full}.{rest[0]}: give a field, e.g. {full}.{rest[0]}.<field>=... ({source})")
            dkey = ".".join(rest[:-1])
            child = mapping.setdefault(dkey, val_tp())
            _set(child, rest[-1:], value, source, f"{full}.{dkey}.")
        else:
            mapping[".".join(rest)] = _convert(value, val_tp, f"{full}.{'.'.join(rest)}", source)
        return
    if rest:
        raise ConfigError(f"{full} is a {_type_name(tp)}, it has no key '{'.'.join(rest)}' ({source})")
    setattr(obj, name, _convert(value, tp, full, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """Layers of (mapping, source) from `path`, following `include:` first (base before child)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    layers: list[tuple[dict, str]] = []
    if "include" in data:
        inc = data.pop("include")
        for rel in [inc] if isinstance(inc, str) else inc:
            layers += _read_yaml(path.parent / rel, (*seen, path))
    return layers + [(data, str(path))]


# ----------------------------------------------------------------------------- value checks

# "Class.field" -> (lowest, highest) allowed, None = unbounded; checked after loading (a negative step count
# would otherwise run nothing and exit 0). Classes of other modules are named here too (no import needed).
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    **{f"TrainConfig.{k}": (0, None) for k in ("steps", "lr", "warmup_steps", "weight_decay", "grad_clip",
                                               "eval_batches", "keep_checkpoints")},
    **{f"TrainConfig.{k}": (1, None) for k in ("batch_size", "grad_accum", "eval_every", "log_every", "ckpt_every")},
    **{f"TrainConfig.{k}": (0, 1) for k in ("min_lr_ratio", "beta1", "beta2")},
    **{f"DataConfig.{k}": (1, None) for k in ("synthetic_docs", "vocab_size", "seq_len")},
    "DataConfig.max_docs": (0, None), "DataConfig.val_fraction": (0, 1),
    **{f"ModelConfig.{k}": (1, None) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "max_seq_len")},
    **{f"ModelConfig.{k}": (0, None) for k in ("vocab_size", "head_dim", "d_ff")},
    "RolePolicy.lr_scale": (0, None), "RolePolicy.weight_decay": (-1, None), "RolePolicy.anchor": (0, 1),
    "PretrainConfig.samples": (0, None),
    "ContinualConfig.eval_every": (0, None), "ContinualConfig.base_rows": (0, None),
}


def validate(cfg: Any, prefix: str = "") -> Any:
    """Check every bounded field (BOUNDS) of `cfg` and its nested configs; ConfigError names the key."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    validate(v, f"{key}.{k}.")
        bounds = BOUNDS.get(f"{type(cfg).__name__}.{f.name}")
        if bounds and isinstance(value, int | float) and not isinstance(value, bool):
            lo, hi = bounds
            if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
                want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ConfigError(f"{key}={value} must be {want}")
    return cfg


def apply_overrides(cfg: Any, overrides: list[str], source: str = "command line") -> Any:
    """Apply `a.b=c` strings to a config dataclass in place; returns it."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value ({source})")
        key, value = ov.split("=", 1)
        _set(cfg, key.strip().split("."), value, f"{source}: {ov}")
    return cfg


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                ignore: tuple[str, ...] = ()) -> Any:
    """Defaults of `cls`, then the YAML file (and its includes), then the overrides. `ignore`: top-level YAML
    keys that belong to another reader of the same file (skipped, not checked)."""
    cfg = cls()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            for k, v in data.items():
                if str(k) not in ignore:
                    _set(cfg, [str(k)], v, source)
    return validate(apply_overrides(cfg, overrides or []))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, source: str = "dict") -> Any:
    cfg = cls()
    for k, v in data.items():
        _set(cfg, [str(k)], v, source)
    return validate(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
