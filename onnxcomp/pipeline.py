"""Runs passes in order over one in-memory model, timing each and recording what it changed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxcomp.errors import OnnxcompError, PassError
from onnxcomp.model_stats import ModelStats, model_stats
from onnxcomp.pass_base import Pass, PassContext

__all__ = ["PassRecord", "Pipeline"]

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did: config, whether it changed the model, counts before/after, wall time."""

    name: str
    config: dict[str, Any]
    changed: bool
    seconds: float
    before: ModelStats
    after: ModelStats
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "changed": self.changed,
            "seconds": round(self.seconds, 4),
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "details": self.details,
        }


class Pipeline:
    """An ordered list of passes."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def run(
        self,
        model: ir.Model,
        ctx: PassContext | None = None,
        *,
        on_pass: Callable[[PassRecord], None] | None = None,
    ) -> list[PassRecord]:
        """Run every pass in order; ``on_pass`` is called with each pass's record as it finishes."""
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for p in self.passes:
            before = model_stats(model)
            started = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except OnnxcompError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name!r} failed: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - started
            after = model_stats(model)
            logger.info("pass %s: changed=%s in %.2fs", p.name, result.changed, seconds)
            record = PassRecord(
                p.name, p.config_dict(), result.changed, seconds, before, after, result.details
            )
            records.append(record)
            if on_pass is not None:
                on_pass(record)
        return records
