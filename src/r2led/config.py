"""Typed configuration: one schema, validated at the edge.

A run's configuration is a ``RunConfig``: the model section is validated against the config
class that the model registry names for ``model.name``, so an unknown or misspelt field
(``model.rhoo``) or a bad value (``model.rho=1.5``) is refused with a message naming it.
Sources: defaults in these classes < YAML files (in order) < ``--set a.b=value`` overrides.

Every numeric field declares its sensible range here, once (``ge``/``le`` on the field); a value
outside it is refused with one line that states the range, e.g.
``invalid configuration: train.lr = 1e6 is out of range: must be in (0, 1]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from r2led.errors import ConfigError


class ModelConfig(BaseModel):
    """Settings every model shares (same embedding size and head for a fair comparison)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "r2led"
    dim: int = Field(32, ge=1, le=8192, description="embedding size d")
    mlp: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [200, 80], max_length=16, description="head MLP hidden sizes"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    heads: int = Field(2, ge=1, le=64, description="attention heads in target attention (must divide dim)")
    short_len: int = Field(20, ge=0, le=1_000_000, description="n_s: most recent behaviours in the short-term route")
    sid_features: bool = Field(False, description="fairness control: add SID prefix embeddings to item features")
    history_profile: bool = Field(
        True,
        description="user feature: share of each behaviour signal (e.g. rating) in the history, and its log length",
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    batch_size: int = Field(512, ge=1, le=1 << 20)
    eval_batch_size: int = Field(2048, ge=1, le=1 << 20)
    epochs: int = Field(3, ge=1, le=10_000)
    patience: int = Field(1, ge=0, le=10_000, description="epochs without valid-AUC gain before stopping")
    evals_per_epoch: int = Field(
        1, ge=1, le=10_000, description="validation checks per epoch (early stopping granularity)"
    )
    t_max: int = Field(
        2048, ge=1, le=100_000_000, description="histories are truncated to the most recent t_max behaviours"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds torch, numpy and random (numpy needs < 2^32)")
    threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads (default: all cores)")
    bucket: int = Field(32, ge=1, le=1_000_000, description="batches per length bucket when shuffling")
    max_train_samples: int | None = Field(None, ge=1, le=2**62, description="subsample train (smoke tests)")
    max_eval_samples: int | None = Field(None, ge=1, le=2**62, description="subsample valid/test (smoke tests)")


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
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError("expected a section of model settings (e.g. model.dim=32), not a single value")
        name = value.get("name", "r2led")
        if not isinstance(name, str):
            raise ConfigError(f"model.name: expected a model name, got {name!r}")
        return model_config_class(name).model_validate(value)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}=...: empty key; expected KEY=VALUE, e.g. model.rho=0.5")
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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"--set {key.strip()}: cannot read value {raw!r}: {problem}") from None
        _set_path(tree, key.strip(), value)
    return tree


def load_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Merge base < YAML files < overrides, then validate; errors name the offending field."""
    tree: dict = dict(base or {})
    for path in files or []:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = _merge(tree, data)
    tree = _merge(tree, parse_overrides(overrides))
    return validate_config(tree)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_range(cls: type[BaseModel] | None, name: str, ctx: dict | None = None) -> str | None:
    """The range a numeric field declares, as text: ``"(0, 1]"``, ``">= 1"``; None if none.

    Read from the field's declaration on ``cls``; without it, from the bound a pydantic error
    reports (``ctx``, e.g. ``{"ge": 0}``).
    """
    info = cls.model_fields.get(name) if cls is not None else None
    bounds = [m for m in info.metadata if isinstance(m, (Gt, Ge, Lt, Le))] if info is not None else []
    if not bounds and ctx:
        bounds = [kind(ctx[key]) for key, kind in (("gt", Gt), ("ge", Ge), ("lt", Lt), ("le", Le)) if key in ctx]
    low = high = None
    for meta in bounds:
        if isinstance(meta, (Gt, Ge)):
            low = f"({_num(meta.gt)}" if isinstance(meta, Gt) else f"[{_num(meta.ge)}"
        else:
            high = f"{_num(meta.lt)})" if isinstance(meta, Lt) else f"{_num(meta.le)}]"
    if low and high:
        return f"{low}, {high}"
    if low:
        return (">" if low[0] == "(" else ">=") + " " + low[1:]
    if high:
        return ("<" if high[-1] == ")" else "<=") + " " + high[:-1]
    return None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def describe_validation_error(
    exc: ValidationError,
    sections: dict[str, type[BaseModel]] | None = None,
    owner: type[BaseModel] | None = None,
    as_options: bool = False,
) -> str:
    """One line for a pydantic error: each bad field, its value, and the range it must be in.

    ``owner`` is the validated class (fields at the top level); ``sections`` maps a top-level
    key to the class of its section (``{"train": TrainConfig, "model": R2ledConfig}``);
    ``as_options`` names fields as the command-line options that set them (``--min-history``).
    """
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).endswith("Config")]
        where = ".".join(loc) or (exc.title or "value")
        if as_options and loc:
            where = "--" + where.replace("_", "-")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        if len(shown) > 60:
            shown = shown[:56] + "...)"
        cls = owner
        if sections and len(loc) == 2:
            cls = sections.get(loc[0])
        rng = field_range(cls, loc[-1] if loc else "", err.get("ctx")) if err["type"] in _RANGE_ERRORS else None
        if rng is not None:
            problems.append(f"{where} = {_num(value)} is out of range: must be {'in ' if ',' in rng else ''}{rng}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}{shown}")
    return "; ".join(problems)


def validate_config(tree: dict) -> RunConfig:
    """A ``RunConfig`` from a nested dict; a bad value raises one-line ``ConfigError``s."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        sections: dict[str, type[BaseModel]] = {"train": TrainConfig, "model": ModelConfig}
        model = tree.get("model") if isinstance(tree, dict) else None
        if isinstance(model, dict) and isinstance(model.get("name", "r2led"), str):
            from r2led.models.registry import MODELS, model_config_class

            name = model.get("name", "r2led")
            if name in MODELS:
                sections["model"] = model_config_class(name)
        raise ConfigError("invalid configuration: " + describe_validation_error(exc, sections, RunConfig)) from None
