"""Typed configuration: one schema, validated at the edge.

A run's configuration is a ``RunConfig``: the model section is validated against the config
class that the model registry names for ``model.name``, so an unknown or misspelt field
(``model.rhoo``) or a bad value (``model.rho=1.5``) is refused with a message naming it.
Sources: defaults in these classes < YAML files (in order) < ``--set a.b=value`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from r2led.errors import ConfigError


class ModelConfig(BaseModel):
    """Settings every model shares (same embedding size and head for a fair comparison)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "r2led"
    dim: int = Field(32, ge=1, description="embedding size d")
    mlp: list[int] = Field(default_factory=lambda: [200, 80], description="head MLP hidden sizes")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    heads: int = Field(2, ge=1, description="attention heads in target attention")
    short_len: int = Field(20, ge=0, description="n_s: most recent behaviours in the short-term route")
    sid_features: bool = Field(False, description="fairness control: add SID prefix embeddings to item features")
    history_profile: bool = Field(
        True, description="user feature: share of each behaviour signal (e.g. rating) in the history, and its log length"
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(512, ge=1)
    eval_batch_size: int = Field(2048, ge=1)
    epochs: int = Field(3, ge=1)
    patience: int = Field(1, ge=0, description="epochs without valid-AUC gain before stopping")
    evals_per_epoch: int = Field(1, ge=1, description="validation checks per epoch (early stopping granularity)")
    t_max: int = Field(2048, ge=1, description="histories are truncated to the most recent t_max behaviours")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    bucket: int = Field(32, ge=1, description="batches per length bucket when shuffling")
    max_train_samples: int | None = Field(None, ge=1, description="subsample train (smoke tests)")
    max_eval_samples: int | None = Field(None, ge=1, description="subsample valid/test (smoke tests)")


class RunConfig(BaseModel):
    """Everything a training run needs besides the data folder."""

    model_config = ConfigDict(extra="forbid")

    sid: str = Field("sid", description="SID table folder, relative to the data folder")
    # SerializeAsAny: dump the model-specific class's fields (k, rho, ...), not only the base's.
    model: SerializeAsAny[ModelConfig] = Field(default_factory=ModelConfig, validate_default=True)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_by_name(cls, value: Any) -> Any:
        from r2led.models.registry import model_config_class

        if isinstance(value, ModelConfig):
            value = value.model_dump()
        value = dict(value or {})
        return model_config_class(value.get("name", "r2led")).model_validate(value)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, val in extra.items():
        out[key] = _merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["model.rho=0.5", "train.lr=1e-3"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.rho=0.5")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_config(files: list[str | Path] | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Merge base < YAML files < overrides, then validate; errors name the offending field."""
    tree: dict = dict(base or {})
    for path in files or []:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = _merge(tree, data)
    tree = _merge(tree, parse_overrides(overrides))
    return validate_config(tree)


def validate_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if not str(p).endswith("Config"))
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            problems.append(f"{where}: {err['msg']}{got}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
