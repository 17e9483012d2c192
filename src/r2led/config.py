"""Typed configuration: one schema, validated at the edge.

A run's configuration is a ``RunConfig``: the model section is validated against the config
class of the model that ``model.name`` names (found through the ``r2led.models`` entry points,
so this layer imports no model), so an unknown or misspelt field (``model.rhoo``) or a bad
value (``model.rho=1.5``) is refused with a message naming it. ``r2led sid build`` reads a
``SidConfig`` and ``r2led bench accuracy`` a ``BenchConfig`` (its ``bench.*`` section) the same
way. Sources: defaults in these classes < YAML files (in order) < ``--set a.b=value`` overrides.

Every numeric field declares its sensible range here, once (``ge``/``le`` on the field); a value
outside it is refused with one line that states the range, e.g.
``invalid configuration: train.lr = 1e6 is out of range: must be in (0, 1]``.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from r2led.errors import ConfigError

# SimHash signature bits m: whole 64-bit words (the signatures are packed into int64 words).
HashBits = Annotated[int, Field(ge=64, le=4096, multiple_of=64)]


class ModelConfig(BaseModel):
    """Settings every model shares (same embedding size and head for a fair comparison)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "r2led"
    dim: int = Field(32, ge=1, le=8192, description="embedding size d")
    mlp: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [200, 80], max_length=16, description="head MLP hidden sizes"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the head MLP")
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
    """How a model is trained: optimiser, batches, epochs and early stopping, history length, seed."""

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


Encoder = Literal["minilm", "tfidf", "collaborative"]
Quantizer = Literal["rq-kmeans", "rq-kmeans-balanced", "rq-vae", "rq-vae-sinkhorn"]
ENCODERS: tuple[str, ...] = get_args(Encoder)


class SidConfig(BaseModel):
    """How ``r2led sid build`` makes a SID table (docs/sid.md); recorded in its ``meta.json``."""

    model_config = ConfigDict(extra="forbid")

    encoder: Encoder = Field("minilm", description="item text (minilm, tfidf) or interactions (collaborative)")
    quantizer: Quantizer = Field("rq-kmeans", description="residual quantizer of the item embeddings")
    levels: int = Field(3, ge=1, le=64, description="semantic levels L")
    codebook: list[Annotated[int, Field(ge=2, le=1 << 20)]] = Field(
        default_factory=lambda: [16],
        min_length=1,
        validate_default=True,  # [16] becomes one size per level
        description="codes per level: one size (every level) or L sizes",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds k-means, the RQ-VAE and the SVDs")
    unique: bool = Field(False, description="append a level that numbers the items sharing a SID")

    @field_validator("codebook", mode="before")
    @classmethod
    def _codebook_list(cls, value: Any) -> Any:
        """``16`` or ``"16"`` -> [16]; ``"16,16,32"`` -> [16, 16, 32]."""
        if isinstance(value, str):
            try:
                return [int(part) for part in value.split(",")]
            except ValueError:
                raise ValueError("expected one size (16) or one per level (16,16,32)") from None
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("codebook")
    @classmethod
    def _one_size_per_level(cls, sizes: list[int], info: ValidationInfo) -> list[int]:
        levels = info.data.get("levels")
        if levels is None:  # levels itself is invalid (and named)
            return sizes
        if len(sizes) == 1:
            return sizes * levels
        if len(sizes) != levels:
            raise ValueError(f"{sizes} gives {len(sizes)} sizes for levels={levels}; give one size or {levels}")
        return sizes


class BenchConfig(BaseModel):
    """What ``r2led bench accuracy`` runs: the ``bench.*`` section of its configuration."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=lambda: list(registered_models()),
        min_length=1,
        description="models to compare",
    )
    seeds: int = Field(3, ge=1, le=1000, description="seeds per model (0..seeds-1)")
    variant_seeds: int | None = Field(
        None, ge=1, le=1000, description="seeds of the fairness and ablation variants (default: seeds)"
    )
    search: bool = Field(False, description="run each model's search on valid first (configs/search.yaml)")
    ablations: bool = Field(True, description="also run R2LED's ablation switches")
    fairness: bool = Field(False, description="also run every baseline with model.sid_features=true")
    replicates: int = Field(1000, ge=1, le=1_000_000, description="user-clustered bootstrap replicates")
    bootstrap_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the bootstrap's user draws")

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, value: Any) -> Any:
        """``"r2led,din"`` -> ["r2led", "din"]."""
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("models")
    @classmethod
    def _models_known(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in registered_models()]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(registered_models())}")
        return value


MODEL_ENTRY_POINTS = "r2led.models"


@cache
def registered_models() -> dict[str, str]:
    """Every model's name -> ``"module:Class"``, R2LED first, then the baselines by name.

    Models register through the ``r2led.models`` entry-point group (``pyproject.toml``), so
    this layer finds a model's settings without importing ``r2led.models``; another package
    can add a model the same way.
    """
    found = sorted(entry_points(group=MODEL_ENTRY_POINTS), key=lambda ep: (ep.name != "r2led", ep.name))
    return {ep.name: ep.value for ep in found}


def model_class(name: str) -> type:
    """The model class registered as ``name`` (imports its module); ``ConfigError`` naming the
    known ones otherwise."""
    models = registered_models()
    if not models:
        raise ConfigError("no model is registered (entry points r2led.models): install r2led, e.g. `make install`")
    if name not in models:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(models)}")
    return load_model_class(models[name])


def model_config_class(name: str) -> type[ModelConfig]:
    """The config class of the registered model ``name`` (a ``ModelConfig`` subclass)."""
    return model_class(name).config_class


def load_model_class(spec: str) -> type:
    """The class an entry point's ``"module:Class"`` names (imports its module)."""
    module, _, attr = spec.partition(":")
    return getattr(import_module(module), attr)


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


def read_tree(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> dict:
    """The settings tree: ``base`` < YAML ``files`` (in order) < ``--set`` ``overrides``; not validated."""
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
    return _merge(tree, parse_overrides(overrides))


def load_config(
    files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    ignore: tuple[str, ...] = (),
) -> RunConfig:
    """Merge base < YAML files < overrides, then validate; errors name the offending field.

    ``ignore``: top-level sections that belong to the command, not to the run (``bench``).
    """
    tree = read_tree(files, overrides, base)
    return validate_config({key: value for key, value in tree.items() if key not in ignore})


def load_sid_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> SidConfig:
    """A ``SidConfig`` from defaults < YAML files < overrides (``--set levels=2``), validated once."""
    return validate_section(SidConfig, read_tree(files, overrides, base), "SID settings")


def load_bench_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> BenchConfig:
    """The ``bench`` section of the settings tree (``--set bench.seeds=5``) as a ``BenchConfig``."""
    section = read_tree(files, overrides, base).get("bench") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"invalid configuration: bench: expected a section of settings, got {section!r:.60}")
    return validate_section(BenchConfig, section, "configuration", prefix="bench.")


def validate_section(cls: type[BaseModel], tree: dict, what: str, prefix: str = "") -> Any:
    """``cls`` validated from ``tree``; a bad value raises one line naming it (``prefix`` + field)."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: " + describe_validation_error(exc, owner=cls, prefix=prefix)) from None


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
    prefix: str = "",
) -> str:
    """One line for a pydantic error: each bad field, its value, and the range it must be in.

    ``owner`` is the validated class (fields at the top level); ``sections`` maps a top-level
    key to the class of its section (``{"train": TrainConfig, "model": R2ledConfig}``);
    ``as_options`` names fields as the command-line options that set them (``--min-history``);
    ``prefix`` goes before every field's name (``bench.``).
    """
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).endswith("Config")]
        where = prefix + ".".join(loc) if loc else (exc.title or "value")
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
        name = model.get("name", "r2led") if isinstance(model, dict) else None
        if isinstance(name, str) and name in registered_models():
            sections["model"] = model_config_class(name)
        raise ConfigError("invalid configuration: " + describe_validation_error(exc, sections, RunConfig)) from None


# ---- the settings as documentation ----------------------------------------------------------
def _values(cls: type[BaseModel], name: str) -> str:
    """What a field accepts, in words: its choices, on/off, or its declared range."""
    annotation = cls.model_fields[name].annotation
    choices = [a for a in get_args(annotation) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is Literal:
        return ", ".join(f"`{c}`" for c in choices)
    if annotation is bool:
        return "on, off"
    rng = field_range(cls, name)
    if rng is not None:
        return rng + (", or unset" if type(None) in get_args(annotation) else "")
    return (
        "list" if getattr(annotation, "__origin__", None) is list else getattr(annotation, "__name__", str(annotation))
    )


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else f"`{value}`"


def settings_table(cls: type[BaseModel], prefix: str = "model.", shared: type[BaseModel] | None = ModelConfig) -> str:
    """A markdown table of ``cls``'s settings (name, default, values, meaning), from its fields.

    Fields declared by ``cls`` come first; those it shares with ``shared`` (every model's) after,
    marked so. ``name`` and fields without a description are left out.
    """
    own = [n for n in cls.model_fields if shared is None or n not in shared.model_fields]
    common = [n for n in cls.model_fields if n not in own]
    rows = ["| setting | default | values | meaning |", "|---|---|---|---|"]
    for name in own + common:
        info = cls.model_fields[name]
        if name == "name" or not info.description:
            continue
        default = info.default_factory() if info.default_factory is not None else info.default
        meaning = info.description + (" (every model)" if name in common else "")
        rows.append(f"| `{prefix}{name}` | {_default(default)} | {_values(cls, name)} | {meaning} |")
    return "\n".join(rows) + "\n"


def replace_marked(text: str, marker: str, block: str) -> str:
    """``text`` with what stands between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ConfigError(f"expected one {start} ... {end} block")
    head, rest = text.split(start)
    return f"{head}{start}\n{block}{end}{rest.split(end, 1)[1]}"
