"""One registry: model name -> (model class, config class)."""

from __future__ import annotations

from r2led.config import ModelConfig, model_class, registered_models

__all__ = ["MODELS", "build_model", "model_class"]

# name -> "module:Class", from the `r2led.models` entry points in pyproject.toml (R2LED first);
# each module is imported on use (``r2led.config.model_class``, which reads this same dict), so
# one model's import cost is paid only when it is used.
MODELS: dict[str, str] = registered_models()


def build_model(cfg: ModelConfig, spec, sid=None):
    """Instantiate the model that ``cfg.name`` names."""
    cls = model_class(cfg.name)
    return cls(cfg, spec, sid if cls.wants_sid(cfg) else None)
