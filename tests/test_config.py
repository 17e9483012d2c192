"""The configuration schema: every number has a declared range, and a bad value is one line."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from r2led.config import (
    BenchConfig,
    SidConfig,
    TrainConfig,
    field_range,
    load_bench_config,
    load_config,
    model_config_class,
)
from r2led.errors import ConfigError
from r2led.models.registry import MODELS


def _numeric_fields(cls: type[BaseModel]) -> list[str]:
    out = []
    for name, info in cls.model_fields.items():
        args = typing.get_args(info.annotation) or (info.annotation,)
        if any(a in (int, float) for a in args) and info.annotation is not bool:
            out.append(name)
    return out


@pytest.mark.parametrize(
    "cls", [TrainConfig, SidConfig, BenchConfig, *(model_config_class(n) for n in MODELS)], ids=lambda c: c.__name__
)
def test_every_number_declares_both_ends_of_its_range(cls):
    for name in _numeric_fields(cls):
        rng = field_range(cls, name)
        assert rng is not None and "," in rng, f"{cls.__name__}.{name} declares {rng!r}"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lr=1e6"], "invalid configuration: train.lr = 1e6 is out of range: must be in (0, 1]"),
        (["train.lr=0"], "train.lr = 0 is out of range: must be in (0, 1]"),
        (["model.rho=-0.1"], "model.rho = -0.1 is out of range: must be in [0, 1]"),
        (["model.k=0"], "model.k = 0 is out of range: must be in [1, 100000]"),
        (["model.name=din", "model.short_len=0"], "model.short_len = 0 is out of range: must be in [1, 1000000]"),
        (["model.dropout=1"], "model.dropout = 1 is out of range: must be in [0, 1)"),
        (["train.seed=4294967296"], "train.seed = 4294967296 is out of range: must be in [0, 4294967295]"),
        (["model=3"], "model: expected a section of model settings (e.g. model.dim=32), not a single value (got 3)"),
        (["train=3"], "train: Input should be a valid dictionary"),
        (["model.name=3"], "model.name: expected a model name, got 3"),
        (["model.dim=30", "model.heads=4"], "model: heads (4) must divide dim (30)"),
        (["train.lr=["], "--set train.lr: cannot read value '['"),
        (["train..lr=1"], "empty key"),
    ],
)
def test_a_bad_value_is_one_line_that_states_the_range(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_a_broken_yaml_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rho: 0.5\n  k: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(line \d+\)") as info:
        load_config([path])
    assert "\n" not in str(info.value)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([path])


def test_values_inside_the_ranges_still_load():
    cfg = load_config(
        None, ["train.lr=1", "model.rho=0", "model.k=100000", "train.seed=4294967295", "model.dim=48", "model.heads=4"]
    )
    assert cfg.train.lr == 1 and cfg.model.k == 100_000 and cfg.model.dim == 48


def test_every_registered_model_is_found_by_the_config_layer_and_r2led_comes_first():
    from r2led import config
    from r2led.models.registry import model_class

    names = list(config.registered_models())
    assert names == list(MODELS) and names[0] == "r2led" and names[1:] == sorted(names[1:]) and len(names) == 9
    for name in names:  # found by the config layer through the entry points, without the registry
        assert config.model_config_class(name) is model_class(name).config_class
        assert load_config(None, [f"model.name={name}"]).model.__class__ is model_class(name).config_class


def test_bench_settings_come_from_the_bench_section_and_runs_ignore_it(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("bench: {models: [din, eta], seeds: 5}\ntrain: {lr: 0.002}\n")
    bench = load_bench_config([path], ["bench.seeds=2", "bench.fairness=true"])
    assert (bench.models, bench.seeds, bench.fairness, bench.replicates) == (["din", "eta"], 2, True, 1000)
    assert load_bench_config(None, ["bench.models=r2led,din"]).models == ["r2led", "din"]
    cfg = load_config([path], ["bench.seeds=2"], ignore=("bench",))
    assert cfg.train.lr == 0.002
    with pytest.raises(ConfigError, match="bench: Extra inputs are not permitted"):
        load_config([path])
    with pytest.raises(
        ConfigError, match=r"^invalid configuration: bench.models: unknown model 'nope'; known: r2led, "
    ):
        load_bench_config(None, ["bench.models=din,nope"])
