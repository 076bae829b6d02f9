"""The one YAML config: defaults, overrides, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfedsam.cli import main
from pfedsam.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ("backbone: vit_x\n", "'backbone' is 'vit_x'; choose one of"),
        ("lora:\n  rnak: 4\n", "unknown key(s) 'lora.rnak'"),
        ("train:\n  local_steps: many\n", "'train.local_steps' must be int"),
        ("train:\n  batch_size: 0\n", "'train.batch_size' must be > 0"),
        ("lmoe:\n  num_experts: 2\n  top_k: 3\n", "'lmoe.top_k' (3) exceeds 'lmoe.num_experts' (2)"),
        ("data:\n  split_fractions: [0.5, 0.5, 0.5]\n", "'data.split_fractions'"),
        ("decoder: frozen\n", "leaves no global parameter"),
        ("train: [1, 2]\n", "'train.' must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("backbone: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/pfedsam.yaml")


@pytest.mark.parametrize(
    "override,key,value",
    [("train.local_steps=3", ("train", "local_steps"), 3), ("prompt=box", ("prompt",), "box"),
     ("lora.alpha=8", ("lora", "alpha"), 8.0), ("data.root=null", ("data", "root"), None)],
)
def test_overrides(override, key, value):
    obj = load_config(overrides=[override])
    for part in key:
        obj = getattr(obj, part)
    assert obj == value


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert main(["config", "--config", str(path)]) == 2
    assert "unknown key(s) 'train.epochs'" in capsys.readouterr().err


def test_cli_info_json(capsys):
    import json

    assert main(["info", "--backbone", "tiny", "--json", "--names"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backbone"] == "tiny"
    assert set(out["params"]) == {"frozen", "global", "local"}
    assert out["params"]["local"] > 0 and out["params"]["global"] > 0
    assert len(out["names"]["global"]) > 0 and all(n.startswith("lmoe.") for n in out["names"]["local"])
