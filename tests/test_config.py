from pathlib import Path

import pytest

from topocl.config import (
    ConfigError,
    PretrainConfig,
    RolePolicy,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

ROOT = Path(__file__).parents[1]


def test_preset_loads_and_overrides_convert_by_type():
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/tiny-dense.yaml",
                      ["train.lr=3e-4", "train.steps=7", "resume=true", "model.nsa.window=64"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.resume is True
    assert cfg.model.nsa.window == 64


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, p)
    msg = str(e.value)
    assert "train.stepz" in msg and str(p) in msg and "steps" in msg and "batch_size" in msg


@pytest.mark.parametrize("override,key", [("train.lr=fast", "train.lr"), ("model.n_layer=2.5", "model.n_layer"),
                                          ("resume=perhaps", "resume"), ("seed=true", "seed")])
def test_wrong_type_is_a_clear_error(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(PretrainConfig, None, [override])


def test_yaml_wrong_type_and_not_a_mapping(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(PretrainConfig, p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")


def test_include_and_role_policies_with_dotted_names(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 5\ntrain:\n  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text(
        "include: base.yaml\ntrain:\n  steps: 3\n  roles:\n    attn.cmp: {lr_scale: 0}\n")
    cfg = load_config(PretrainConfig, tmp_path / "child.yaml", ["train.roles.attn.slc.lr_scale=2"])
    assert cfg.seed == 5 and cfg.train.lr == 0.1 and cfg.train.steps == 3
    assert cfg.train.roles == {"attn.cmp": RolePolicy(lr_scale=0.0), "attn.slc": RolePolicy(lr_scale=2.0)}
    with pytest.raises(ConfigError, match="lr_scal"):
        load_config(PretrainConfig, None, ["train.roles.attn.lr_scal=1"])


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(PretrainConfig, None, ["train.roles.mlp.anchor=0.5", "model.d_model=64"])
    save_config(cfg, tmp_path / "c.yaml")
    import yaml

    again = from_dict(PretrainConfig, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg and to_dict(again) == to_dict(cfg)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(PretrainConfig, None, ["train.lr"])
