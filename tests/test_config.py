from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from attn_search import AttentionConfig, load_config


def test_defaults_and_partial_dict() -> None:
    c = AttentionConfig.from_dict({"pattern": "window", "window": 32})
    assert c.pattern == "window" and c.window == 32
    assert c.d_model == AttentionConfig().d_model
    assert c.pattern_params() == {"window": 32}
    assert c.head_dim == c.d_model // c.n_heads


def test_field_names_are_the_public_contract() -> None:
    names = [f.name for f in dataclasses.fields(AttentionConfig)]
    assert names == [
        "d_model", "n_layers", "n_heads", "pattern", "window", "dilation", "stride", "block_size",
        "n_global", "n_random", "causal", "dropout", "attn_dropout", "weight_decay", "label_smoothing",
        "lr", "warmup_steps", "batch_size", "seed",
    ]  # fmt: skip


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttentionConfig().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_load_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    c = AttentionConfig(pattern="bigbird", n_heads=8, lr=0.000123456789, dropout=0.1, causal=False, seed=7)
    path = c.save(tmp_path / f"cfg{suffix}")
    back = AttentionConfig.load(path)
    assert back == c
    assert back.to_dict() == c.to_dict()
    assert load_config(path) == c


def test_dict_round_trip_and_types() -> None:
    c = AttentionConfig(lr=1)  # an int for a float field is accepted as float
    assert isinstance(c.lr, float)
    assert AttentionConfig.from_dict(c.to_dict()) == c
    assert AttentionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_yaml_scientific_notation_string_is_accepted(tmp_path: Path) -> None:
    # YAML 1.1 reads `1e-3` (no dot) as a string; users write it all the time.
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\npattern: window\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-3"
    assert AttentionConfig.load(path).lr == 1e-3


def test_load_reads_an_export_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({"config": {"pattern": "window", "window": 8}, "metrics": {"accuracy": 0.5}}))
    assert load_config(path).window == 8


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"n_heads": 5}, r"n_heads=5 does not divide d_model=64: use n_heads in \[1, 2, 4, 8, 16, 32, 64\]"),
        ({"window": 0}, "window=0 is invalid: it must be >= 1"),
        ({"pattern": "sparse"}, "pattern='sparse' is unknown: use one of dense, window"),
        ({"dropout": 1.0}, r"dropout=1.0 is invalid: it must be in \[0, 1\)"),
        ({"lr": -1.0}, "lr=-1.0 is invalid"),
        ({"n_heads": "4"}, "n_heads='4' is invalid: expected int"),
        ({"causal": 1}, "causal=1 is invalid: expected bool"),
        ({"d_model": 48, "n_heads": 16}, "odd head size 3"),
        ({"windw": 3}, "unknown config field"),
    ],
)
def test_invalid_values_name_field_value_and_fix(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionConfig.from_dict(fields)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("n_heads: 3\n")
    with pytest.raises(ValueError, match=r"wrong\.yaml: n_heads=3"):
        load_config(wrong)
    with pytest.raises(ValueError, match=r"unknown config format \.txt"):
        load_config(tmp_path / "c.txt")
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
