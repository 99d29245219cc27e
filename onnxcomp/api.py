"""The Python API: ``onnxcomp.optimize(model, ...)`` does what ``onnxcomp optimize`` does.

Load → passes (in memory) → save to a staging folder → verify (checker, ONNX Runtime, fidelity on
held-out samples) → move into place (→ pack). Nothing is written unless verification passed, and the
input is never modified.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxcomp import __version__
from onnxcomp.errors import CalibrationError, OnnxcompError, OutputError, VerificationError
from onnxcomp.fileio import default_file_mode
from onnxcomp.model_io import check_no_nan_weights, check_output_path, load_model, staged_save
from onnxcomp.model_stats import model_stats
from onnxcomp.pass_base import PassContext
from onnxcomp.pipeline import Pipeline
from onnxcomp.progress import NullProgress, Progress
from onnxcomp.recipe import Recipe, apply_overrides, parse_recipe, read_recipe_data
from onnxcomp.verify import verify_model

__all__ = ["ModelInput", "OptimizeResult", "default_output_path", "optimize", "resolve_recipe"]

logger = logging.getLogger(__name__)

ModelInput = str | os.PathLike[str] | onnx.ModelProto | ir.Model | Any  # Any: onnx_graphsurgeon.Graph


@dataclass
class OptimizeResult:
    """What ``optimize`` produced: the model (in memory), where it was written, and the report."""

    model: ir.Model
    output_path: Path | None
    report: dict[str, Any]
    artifact_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verification", {}).get("passed", False))


def default_output_path(model_path: Path) -> Path:
    """``model.onnx`` → ``model.onnxcomp.onnx`` beside it."""
    return model_path.with_name(f"{model_path.stem}.onnxcomp.onnx")


def _files_size(path: Path) -> int:
    """Bytes of a model file plus the external data files it references."""
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    seen: set[str] = set()
    tensors = list(proto.graph.initializer)
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                f = path.parent / entry.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def resolve_recipe(
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    overrides: Sequence[str] = (),
    target: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    model_path: str | os.PathLike[str] | None = None,
) -> Recipe:
    """Turn a recipe argument (object, file, built-in name, dict or ``None`` = default) into a Recipe,
    applying ``--set`` overrides and the ``--target`` / ``--calib`` shortcuts."""
    if isinstance(recipe, Recipe):
        data = recipe.as_dict()
        source = recipe.source
    elif recipe is None:
        from onnxcomp.defaults import default_recipe_data

        data = default_recipe_data(calibrated=calib is not None, target=target, model_path=model_path)
        source = "default"
    elif isinstance(recipe, Mapping):
        data, source = dict(recipe), "recipe"
    else:
        data, source = read_recipe_data(recipe)
    data = apply_overrides(data, list(overrides))
    if target is not None:
        data.setdefault("target", {})["name"] = target
    if calib is not None:
        data.setdefault("calibration", {})["data"] = str(calib)
    return parse_recipe(data, source=source)


def _materialize_input(model: ModelInput, workdir: Path) -> tuple[Path, bool]:
    """A path to the input model on disk (writing in-memory inputs to ``workdir``); True if temporary."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model), False
    path = workdir / "input.onnx"
    if isinstance(model, ir.Model):
        ir.save(model, path, external_data="input.onnx.data", size_threshold_bytes=1024)
        return path, True
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
        return path, True
    try:
        import onnx_graphsurgeon as gs

        if isinstance(model, gs.Graph):
            onnx.save(gs.export_onnx(model), str(path))
            return path, True
    except ImportError:  # pragma: no cover
        pass
    raise OnnxcompError(
        f"cannot optimize a {type(model).__name__}; pass a path, an onnx.ModelProto, an onnx_ir.Model "
        "or an onnx_graphsurgeon.Graph"
    )


def _resolve_target(recipe: Recipe) -> Any:
    if not recipe.target:
        return None
    from onnxcomp.targets.registry import get_target

    return get_target(recipe.target)


def _calibration_sources(recipe: Recipe, model: ir.Model) -> tuple[Any, Any]:
    """(calibration source or None, held-out verification source or None)."""
    if not recipe.calibration or (
        recipe.calibration.get("data") is None and recipe.calibration.get("kind") in (None, "auto")
    ):
        return None, None
    from onnxcomp.calibration.config import CalibrationConfig
    from onnxcomp.calibration.sources import open_source
    from onnxcomp.config import from_mapping

    table = recipe.calibration
    if table.get("data") is not None and table.get("kind", "auto") in ("auto", "images"):
        from onnxcomp.calibration.sources import detect_kind

        kind = detect_kind(str(table["data"])) if table.get("kind", "auto") == "auto" else "images"
        if kind == "images" and not any(k in table for k in ("scale", "mean", "std")):
            raise CalibrationError(
                f"{table['data']}: image calibration needs an explicit preprocessing spec (how pixels become "
                "model inputs): set calibration.scale, mean, std (and channel_order, layout, resize) in the "
                "recipe or with --set, e.g. --set calibration.scale=0.00392156862745098 for RGB in 0..1"
            )
    config = from_mapping(CalibrationConfig, table, where="calibration")
    source = open_source(config, model=model)
    holdout = getattr(config, "holdout", 0) or 0
    if holdout:
        return source.split(holdout)
    return source, None


def _lossless(recipe: Recipe) -> bool:
    from onnxcomp.pass_base import get_pass_class

    return all(getattr(get_pass_class(s.name), "lossless", False) for s in recipe.passes)


def optimize(
    model: ModelInput,
    *,
    output: str | os.PathLike[str] | None = None,
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    target: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    pack: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    verify_samples: Iterable[dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Compress ``model`` with ``recipe`` (default: the best safe recipe for the data given), verify it
    and write it to ``output`` (nothing is written when ``output`` is None and the input was in memory).

    Raises an :class:`OnnxcompError` subclass with a one-line message on any problem; the input is
    never modified and no partial output is left behind.
    """
    progress = progress or NullProgress()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="onnxcomp-input-"))
    try:
        input_path, temporary = _materialize_input(model, workdir)
        resolved = resolve_recipe(
            recipe,
            overrides=overrides,
            target=target,
            calib=calib,
            model_path=input_path if recipe is None and calib is not None else None,
        )
        out_path: Path | None = Path(output) if output is not None else None
        if out_path is None and resolved.output.path:
            out_path = Path(resolved.output.path)
        if out_path is None and not temporary:
            out_path = default_output_path(input_path)
        if out_path is not None:
            check_output_path(out_path, inputs=(input_path,), force=force)
        if pack is not None:
            check_output_path(pack, inputs=(input_path,), force=force)
        if report_path is not None:
            check_output_path(report_path, inputs=(input_path,), force=force)

        ir_model = load_model(input_path)
        check_no_nan_weights(ir_model, source=str(input_path))
        target_obj = _resolve_target(resolved)
        if target_obj is not None:
            target_obj.check_recipe(resolved)
            target_obj.check_model(input_path)  # e.g. a QDQ input for a target without INT8
        passes = resolved.build_passes()
        calib_source, holdout = _calibration_sources(resolved, ir_model)
        needing = [p.name for p in passes if getattr(p, "needs_calibration", False)]
        if needing and calib_source is None:
            raise CalibrationError(
                f"pass {needing[0]!r} needs calibration data; pass --calib DATA (an .npz of model inputs, "
                "a folder of images, ...) or set [calibration] data in the recipe"
            )
        input_stats = model_stats(ir_model)
        input_size = _files_size(input_path)
        ctx = PassContext(
            calibration=(lambda: iter(calib_source)) if calib_source is not None else None,
            target=target_obj,
            progress=progress,
        )
        with progress.task("running passes", total=len(passes)) as step:
            records = Pipeline(passes).run(ir_model, ctx, on_pass=lambda _record: step(1))
        lossless = _lossless(resolved)
        stage_dest = out_path if out_path is not None else workdir / "optimized.onnx"
        result_report: dict[str, Any] = {}
        artifact: Path | None = None
        with staged_save(
            ir_model,
            stage_dest,
            external_data=resolved.output.external_data,
            external_data_over=int(resolved.output.external_data_over_mb * (1 << 20)),
        ) as staged:
            target_issues = _check_target_output(target_obj, staged.path)
            if resolved.verify.enabled:
                samples = (
                    verify_samples
                    if verify_samples is not None
                    else (iter(holdout) if holdout is not None else None)
                )
                with progress.task("verifying", total=None):
                    verification = verify_model(
                        input_path,
                        staged.path,
                        samples,
                        lossless=lossless,
                        config=resolved.verify,
                        data_source="held-out calibration samples" if holdout is not None else "user data",
                        # ORT's fused int8 CPU kernels are not what a TensorRT target runs: check the graph itself
                        optimization="basic"
                        if getattr(target_obj, "runtime", "onnxruntime") != "onnxruntime"
                        else "all",
                    )
                if not verification.passed:
                    raise VerificationError(
                        f"verification failed: {verification.failures[0]}; nothing was written "
                        "(relax [verify] in the recipe or choose a milder recipe)"
                    )
                verification_dict = verification.as_dict()
            else:
                verification_dict = {"passed": None, "skipped": "verify.enabled = false"}
            output_size = staged.size_bytes()
            if pack is not None or resolved.pack.get("enabled", bool(resolved.pack)):
                # packed and checked against the staged model before anything is committed
                check_feeds = list(itertools.islice(iter(holdout), 2)) if holdout is not None else None
                artifact = _pack(
                    ir_model,
                    resolved,
                    pack,
                    out_path or input_path,
                    progress,
                    check=_artifact_check(staged.path, check_feeds),
                )
            written: Path | None = None
            if out_path is not None:
                try:
                    written = staged.commit()
                except BaseException:
                    if artifact is not None:
                        artifact.unlink(missing_ok=True)
                    raise
        result_report = {
            "onnxcomp_version": __version__,
            "input": {
                "path": None if temporary else str(input_path),
                "size_bytes": input_size,
                **input_stats.as_dict(),
            },
            "output": {
                "path": str(written) if written else None,
                "size_bytes": output_size,
                **model_stats(ir_model).as_dict(),
            },
            "size_ratio": (input_size / output_size) if output_size else None,
            "passes": [r.as_dict() for r in records],
            "verification": verification_dict,
            "target": getattr(target_obj, "name", None),
            "recipe": resolved.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if target_issues is not None:
            result_report["target_issues"] = target_issues
        if artifact is not None:
            result_report["artifact"] = {"path": str(artifact), "size_bytes": artifact.stat().st_size}
        warnings = [f"{r.name}: {r.details['warning']}" for r in records if r.details.get("warning")]
        if resolved.verify.enabled and verification_dict.get("data_source", "").startswith("synthetic"):
            warnings.append(
                "verified on synthetic inputs only; pass --calib DATA for a meaningful fidelity check"
            )
        latency = verification_dict.get("latency") or {}
        if latency and getattr(target_obj, "runtime", "onnxruntime") != "onnxruntime":
            latency["slower"] = None  # measured on ONNX Runtime CPU: says nothing about the target's speed
            latency["note"] = (
                f"ONNX Runtime CPU on this host, not {target_obj.name}; use onnxcomp profile on the target"
            )
        if latency.get("slower"):
            warnings.append(
                f"the optimized model ran {latency['ratio']:.2f}x the original's latency in a quick check on this host "
                "(confirm with `onnxcomp profile ORIGINAL OPTIMIZED`; consider a recipe for your target)"
            )
        result_report["warnings"] = warnings
        if report_path is not None:
            _write_json_atomic(Path(report_path), result_report)
        return OptimizeResult(ir_model, written, result_report, artifact, warnings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _check_target_output(target: Any, path: Path) -> list[dict[str, Any]] | None:
    """Refuse an output the target cannot run; for TensorRT targets also run the parser compatibility check."""
    if target is None:
        return None
    target.check_model(path)
    if getattr(target, "runtime", None) != "tensorrt":
        return None
    from onnxcomp.targets.tensorrt import DEFAULT_TRT_VERSION, assert_compatible

    issues = assert_compatible(path, target.trt_version or DEFAULT_TRT_VERSION, target=target)
    return [i.as_dict() for i in issues]


def _artifact_check(plain: Path, feeds: list[dict[str, Any]] | None) -> Callable[[Path], None]:
    """A check for a freshly written artifact: it must load with :func:`onnxcomp.runtime.load_session`
    and give the plain model's outputs (``|a - b| <= 1e-5·max(1, |a|max)``; the packing rewrites are
    exact, so in practice they are bit-identical) on ``feeds`` (synthetic inputs when None)."""

    def check(artifact: Path) -> None:
        import numpy as np

        from onnxcomp.runtime import load_session
        from onnxcomp.verify import synthetic_samples

        try:
            packed = load_session(artifact)
        except Exception as exc:
            raise VerificationError(
                f"the packed artifact does not load in ONNX Runtime ({type(exc).__name__}: {exc}); "
                "nothing was written"
            ) from exc
        reference = load_session(plain)
        for feed in feeds if feeds is not None else synthetic_samples(reference, 2, seed=0):
            try:
                expected = reference.run(None, feed)
            except Exception:  # the model rejects synthetic inputs: loading was the check
                return
            got = packed.run(None, feed)
            for meta, a, b in zip(reference.get_outputs(), expected, got, strict=True):
                a, b = np.asarray(a), np.asarray(b)
                if a.dtype.kind not in "fc":
                    same = a.shape == b.shape and np.array_equal(a, b)
                else:
                    tol = 1e-5 * max(1.0, float(np.nanmax(np.abs(a))) if a.size else 1.0)
                    same = a.shape == b.shape and bool(
                        np.all((np.abs(a.astype(np.float64) - b) <= tol) | (np.isnan(a) & np.isnan(b)))
                    )
                if not same:
                    raise VerificationError(
                        f"the packed artifact's output {meta.name!r} differs from the written model's; "
                        "nothing was written (pack with --set pack.simplify_qdq=false or pack.compact=false)"
                    )

    return check


def _pack(
    model: ir.Model,
    recipe: Recipe,
    pack: Any,
    base: Path,
    progress: Progress,
    *,
    check: Callable[[Path], None] | None = None,
) -> Path:
    from onnxcomp.config import from_mapping
    from onnxcomp.packing import PackConfig, pack_model

    options = {k: v for k, v in recipe.pack.items() if k != "enabled"}
    config = from_mapping(PackConfig, options, where="pack")
    if pack is not None:
        dest = Path(pack)
    elif config.path:
        dest = Path(config.path)
    else:
        dest = base.with_name(base.name.removesuffix(".onnx") + ".zip")
    report = pack_model(model, dest, config=config, recipe=recipe.as_dict(), progress=progress, check=check)
    return Path(getattr(report, "path", dest))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".onnxcomp-report-")
    default_file_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report ({exc.strerror})") from exc
