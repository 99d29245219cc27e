"""Pass framework: a pass is a class with a frozen, validated ``Config`` dataclass and a short name.

``Pass.run(model, ctx) -> PassResult`` mutates the in-memory ``ir.Model`` and says truthfully whether
it changed it; ``details`` is JSON-friendly and goes into the report. Passes never touch the file
system: anything they need (calibration samples, the target, progress) comes through ``PassContext``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcomp.config import from_mapping, validate_config
from onnxcomp.errors import RecipeError
from onnxcomp.progress import NullProgress, Progress

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "available_passes",
    "create_pass",
    "get_pass_class",
    "register_pass",
]

Sample = dict[str, np.ndarray]


@dataclass
class PassResult:
    changed: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the model.

    ``calibration`` is a zero-argument callable returning a fresh iterable of samples
    (``{input_name: ndarray}``), or ``None`` when the user gave no data. ``target`` is a
    ``onnxcomp.targets`` Target or ``None``. ``original`` is the unmodified input model (read-only).
    """

    calibration: Callable[[], Iterable[Sample]] | None = None
    target: Any = None
    progress: Progress = field(default_factory=NullProgress)
    original: ir.Model | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def calibration_samples(self) -> Iterator[Sample]:
        if self.calibration is None:
            return iter(())
        return iter(self.calibration())


class Pass(abc.ABC):
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``run``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    #: True when the pass needs calibration samples to run at all.
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, Mapping):
            config = from_mapping(self.Config, config, where=self.name)
        elif not isinstance(config, self.Config):
            raise RecipeError(f"{self.name}: config must be a {self.Config.__name__} or a table of options")
        else:
            validate_config(config, where=self.name)
        self.config = config

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Transform ``model`` in place."""

    def config_dict(self) -> dict[str, Any]:
        from onnxcomp.config import config_to_dict

        return config_to_dict(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_REGISTRY: dict[str, type[Pass]] = {}
_DISCOVERED = False
_BROKEN: dict[str, str] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"pass name {cls.name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import onnxcomp.passes as passes_pkg

    for info in pkgutil.iter_modules(passes_pkg.__path__):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"onnxcomp.passes.{info.name}")
            except Exception as exc:  # a broken optional pass must not take the others down
                _BROKEN[info.name] = f"{type(exc).__name__}: {exc}"
    _DISCOVERED = True


def available_passes() -> dict[str, type[Pass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        broken = next(
            (f"; module {m!r} failed to import ({e})" for m, e in _BROKEN.items() if name.startswith(m)), ""
        )
        raise RecipeError(f"unknown pass {name!r}; available passes: {', '.join(passes)}{broken}")
    return passes[name]


def create_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    return get_pass_class(name)(dict(options or {}))
