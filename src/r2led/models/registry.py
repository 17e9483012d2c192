"""One registry: model name -> (model class, config class)."""

from __future__ import annotations

from importlib import import_module

from r2led.config import ModelConfig
from r2led.errors import ConfigError

# name -> "module:Class"; imported on use so one model's import cost is paid only when used.
MODELS: dict[str, str] = {
    "r2led": "r2led.models.r2led:R2LED",
    "din": "r2led.models.din:DIN",
    "din-long": "r2led.models.din:DINLong",
    "avgpool": "r2led.models.avgpool:AvgPool",
    "sim-hard": "r2led.models.sim:SimHard",
    "sim-soft": "r2led.models.sim:SimSoft",
    "eta": "r2led.models.eta:ETA",
    "sdim": "r2led.models.sdim:SDIM",
    "twin": "r2led.models.twin:TWIN",
}


def model_class(name: str):
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(MODELS)}")
    module, cls = MODELS[name].split(":")
    return getattr(import_module(module), cls)


def model_config_class(name: str) -> type[ModelConfig]:
    return model_class(name).config_class


def build_model(cfg: ModelConfig, spec, sid=None):
    """Instantiate the model that ``cfg.name`` names."""
    cls = model_class(cfg.name)
    return cls(cfg, spec, sid if cls.wants_sid(cfg) else None)
