"""One registry: model name -> (model class, config class)."""

from __future__ import annotations

from r2led.config import ModelConfig, load_model_class, registered_models
from r2led.errors import ConfigError

# name -> "module:Class", from the `r2led.models` entry points in pyproject.toml (R2LED first);
# each module is imported on use, so one model's import cost is paid only when it is used.
MODELS: dict[str, str] = dict(registered_models())


def model_class(name: str):
    """The model class registered as ``name``; ConfigError naming the known ones otherwise."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(MODELS)}")
    return load_model_class(MODELS[name])


def build_model(cfg: ModelConfig, spec, sid=None):
    """Instantiate the model that ``cfg.name`` names."""
    cls = model_class(cfg.name)
    return cls(cfg, spec, sid if cls.wants_sid(cfg) else None)
