"""Every YAML under configs/ loads through the strict config loader; pretraining presets also build their model
(on the meta device: no memory, no time) at the size their name promises."""

from pathlib import Path

import pytest
import torch

from topocl.config import PretrainConfig, load_config
from topocl.model import GPT

ROOT = Path(__file__).parents[1] / "configs"
SIZES = {"20m": (15e6, 35e6), "100m": (75e6, 130e6)}  # total parameters, embeddings included


def presets(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.yaml"))


@pytest.mark.parametrize("path", presets("pretrain"), ids=lambda p: p.stem)
def test_pretrain_preset_loads_and_builds(path):
    cfg = load_config(PretrainConfig, path)
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    with torch.device("meta"):
        n = GPT(cfg.model).num_params()
    for tag, (lo, hi) in SIZES.items():
        if path.stem.endswith(tag):
            assert lo <= n <= hi, f"{path.name}: {n / 1e6:.1f}M parameters"


@pytest.mark.parametrize("path", presets("continual"), ids=lambda p: p.stem)
def test_continual_preset_loads(path):
    from topocl.continual import ContinualConfig

    load_config(ContinualConfig, path)


@pytest.mark.parametrize("path", presets("surgery"), ids=lambda p: p.stem)
def test_surgery_preset_loads(path):
    from topocl.surgery.cli import SurgeryRunConfig

    load_config(SurgeryRunConfig, path)


@pytest.mark.parametrize("path", presets("arena"), ids=lambda p: p.stem)
def test_arena_models_load(path):
    pytest.importorskip("fastapi")
    from topocl.arena.serving import load_specs

    specs = load_specs(path)
    assert specs and len({s.name for s in specs}) == len(specs)


def test_arena_models_yaml_is_strict(tmp_path):
    pytest.importorskip("fastapi")
    from topocl.arena.serving import load_specs
    from topocl.config import ConfigError

    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - {name: a, kind: scripted, temprature: 0.5}\n  - {name: b, kind: scripted}\n")
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown key\(s\) \['temprature'\]; valid keys: name"):
        load_specs(bad)
    bad.write_text("models:\n  - {name: a, kind: scripted, max_new_tokens: many}\n  - {name: b, kind: scripted}\n")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_specs(bad)


def test_every_config_folder_is_covered():
    folders = {"pretrain", "continual", "surgery", "sweeps", "arena", "capacity"}
    assert {p.name for p in ROOT.iterdir() if p.is_dir()} <= folders
