"""Sweeps: run a grid of recipes on one model, cache each point, tabulate and plot the Pareto fronts.

A grid (TOML; built-ins in ``onnxcomp/grids``: ``seed003``, ``seed001``) is a recipe template with
``"{axis}"`` placeholders, the axes' values (the grid is their Cartesian product), optional extra
points, and ``[[cases]]`` that adjust the recipe where axis values match::

    name = "seed003"
    [axes]
    alpha = [0.0, 0.25, 0.5, 0.75]
    bits = [32, 16, 8, 4, 3]
    [[passes]]
    name = "prune"
    method = "alpha-sigma"
    alpha = "{alpha}"          # a string that is exactly "{axis}" becomes the axis value itself
    quantize = "seed003"
    bits = "{bits}"
    [[cases]]
    when = { bits = 32 }
    set = { "passes.prune.quantize" = "none" }
    [[cases]]
    when = { alpha = 0.0, bits = 32 }
    drop = ["prune"]           # no passes left: the uncompressed control

Each point is measured with :func:`onnxcomp.zoo.measure_recipe` (metric, file and Deflate-packed size,
weight sparsity, latency ratio of interleaved medians against the original). Results are cached in
``OUT/cache/<sha256(model sha256, recipe hash, data key, onnxcomp version)>.json``, so an interrupted sweep
resumes where it stopped. Points run in local processes (``ProcessPoolExecutor``) or, with
``ray_address``, as Ray tasks that receive the model bytes once through the object store.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from onnxcomp import __version__
from onnxcomp.errors import OnnxcompError
from onnxcomp.fileio import default_file_mode
from onnxcomp.zoo import ZooData, ZooError, load_data, load_manifest, measure_recipe, recipe_hash

__all__ = [
    "Grid",
    "GridPoint",
    "SweepResult",
    "builtin_grids",
    "load_grid",
    "pareto_front",
    "pivot_table",
    "run_sweep",
]

logger = logging.getLogger(__name__)

#: bump when the measured fields change, so old cache entries are not reused
_CACHE_SCHEMA = 2
_GRID_KEYS = {"name", "description", "axes", "passes", "recipe", "cases", "points", "metric"}


@dataclass(frozen=True)
class GridPoint:
    label: str
    values: dict[str, Any]
    recipe: dict[str, Any]


@dataclass
class Grid:
    """A recipe template, its axes and the adjustments (``cases``) that make every point valid."""

    name: str
    axes: dict[str, list[Any]]
    template: dict[str, Any]
    cases: list[dict[str, Any]] = field(default_factory=list)
    extra_points: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    def points(self) -> list[GridPoint]:
        product = [dict(zip(self.axes, vals, strict=True)) for vals in itertools.product(*self.axes.values())]
        combos = [dict(e) for e in self.extra_points if e not in product] + product
        out = []
        for values in combos:
            recipe = _substitute(copy.deepcopy(self.template), values)
            for case in self.cases:
                if all(_equal(values.get(k), v) for k, v in case.get("when", {}).items()):
                    for dotted, val in case.get("set", {}).items():
                        _set_path(recipe, dotted, _substitute(copy.deepcopy(val), values))
                    drop = set(case.get("drop", []))
                    recipe["passes"] = [p for p in recipe.get("passes", []) if p.get("name") not in drop]
            label = ",".join(f"{k}={_fmt_value(v)}" for k, v in values.items())
            recipe.setdefault("description", f"{self.name}: {label}")
            out.append(GridPoint(label, values, recipe))
        return out


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, list):
        return any(_equal(a, x) for x in b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _substitute(obj: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(obj, str):
        for k, v in values.items():
            if obj == "{" + k + "}":
                return v
        for k, v in values.items():
            obj = obj.replace("{" + k + "}", _fmt_value(v))
        return obj
    if isinstance(obj, list):
        return [_substitute(x, values) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, values) for k, v in obj.items()}
    return obj


def _set_path(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if parts[0] == "passes" and len(parts) == 3:
        hits = [p for p in recipe.get("passes", []) if p.get("name") == parts[1]]
        if not hits:
            raise ZooError(f"grid case sets {dotted!r} but the recipe has no pass {parts[1]!r}")
        for p in hits:
            p[parts[2]] = value
    elif len(parts) == 2:
        recipe.setdefault(parts[0], {})[parts[1]] = value
    else:
        raise ZooError(f"grid case key {dotted!r}: expected passes.NAME.key or section.key")


def builtin_grids() -> dict[str, Path]:
    """Grids shipped with onnxcomp (``--grid seed003``)."""
    folder = Path(__file__).with_name("grids")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def load_grid(name_or_path: str | os.PathLike[str]) -> Grid:
    """A grid from a TOML file or a built-in grid name."""
    path = Path(name_or_path)
    if not path.is_file():
        grids = builtin_grids()
        if str(name_or_path) not in grids:
            raise ZooError(
                f"{name_or_path}: no such grid file; built-in grids: {', '.join(grids) or '(none)'}"
            )
        path = grids[str(name_or_path)]
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ZooError(f"{path}: not valid TOML ({exc})") from exc
    bad = set(doc) - _GRID_KEYS
    if bad:
        raise ZooError(f"{path}: unknown key {sorted(bad)[0]!r}; valid: {', '.join(sorted(_GRID_KEYS))}")
    axes = doc.get("axes", {})
    if not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise ZooError(f"{path}: [axes] needs at least one axis with a non-empty list of values")
    template = dict(doc.get("recipe", {}))
    if "passes" in doc:
        template["passes"] = doc["passes"]
    grid = Grid(
        name=str(doc.get("name", path.stem)),
        axes={k: list(v) for k, v in axes.items()},
        template=template,
        cases=list(doc.get("cases", [])),
        extra_points=list(doc.get("points", [])),
        description=str(doc.get("description", "")),
    )
    from onnxcomp.recipe import parse_recipe

    for point in grid.points():  # fail before running anything
        try:
            parse_recipe(point.recipe, source=f"{path.name} [{point.label}]")
        except OnnxcompError as exc:
            raise ZooError(str(exc)) from exc
    return grid


# ---------------------------------------------------------------------------------------------- running


@functools.lru_cache(maxsize=4)
def _data_from_spec(spec_json: str) -> ZooData:
    spec = json.loads(spec_json)
    if "manifest" in spec:
        man = load_manifest(spec["manifest"], zoo_root=spec.get("zoo_root"))
        entry = man.entry(spec["entry"])
        data = man.load_data(entry)
        data.metric_name = entry.metric
        return data
    return load_data(spec["data"], base=Path(spec.get("base", ".")), zoo_root=Path(spec.get("zoo_root", ".")))


def _sweep_task(task: dict[str, Any]) -> dict[str, Any]:
    """Measure one grid point (runs in a worker process or a Ray task)."""
    data = _data_from_spec(task["data_spec"])
    m = measure_recipe(
        Path(task["model_path"]),
        task["recipe"],
        data,
        model_name=task["model_name"],
        recipe_name=task["label"],
        latency_repeats=task["latency_repeats"],
        threads=task["threads"],
    )
    return {"label": task["label"], "values": task["values"], "key": task["key"], **m.as_dict()}


def _ray_task(model_bytes: bytes, task: dict[str, Any]) -> dict[str, Any]:
    """Ray: the model arrives once through the object store and is written to a local scratch file."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ray-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        return _sweep_task({**task, "model_path": str(path)})


def _sha256(path: Path) -> str:
    from onnxcomp.zoo import files_of
    from onnxcomp.zoo_fetch import sha256_file

    return hashlib.sha256("".join(sha256_file(f) for f in files_of(path)).encode()).hexdigest()


@dataclass
class SweepResult:
    model: str
    model_sha256: str
    grid: Grid
    rows: list[dict[str, Any]]
    reference_metric: float | None
    out_dir: Path
    cached: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "grid": self.grid.name,
            "grid_description": self.grid.description,
            "axes": self.grid.axes,
            "onnxcomp_version": __version__,
            "reference_metric": self.reference_metric,
            "cached_points": self.cached,
            "seconds": round(self.seconds, 2),
            "points": self.rows,
        }


def _run_local(tasks: list[dict[str, Any]], jobs: int, done: Callable[[dict[str, Any]], None]) -> None:
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            done(_sweep_task(t))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_sweep_task, t) for t in tasks]
        for fut in as_completed(futures):
            done(fut.result())


def _run_ray(
    tasks: list[dict[str, Any]], model_path: Path, address: str, done: Callable[[dict[str, Any]], None]
) -> None:
    try:
        import ray
    except ImportError as exc:
        raise ZooError("--ray needs `pip install onnxcomp[ray]`") from exc
    if not ray.is_initialized():
        ray.init(
            address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False
        )
    remote = ray.remote(num_cpus=1)(_ray_task)
    model_ref = ray.put(model_path.read_bytes())
    pending = [remote.remote(model_ref, t) for t in tasks]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            done(ray.get(ref))


def run_sweep(
    model: str | os.PathLike[str],
    grid: Grid,
    *,
    data_spec: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    model_name: str | None = None,
    jobs: int | None = None,
    ray_address: str | None = None,
    latency_repeats: int = 20,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    plots: bool = True,
) -> SweepResult:
    """Run every point of ``grid`` on ``model`` (cached), then write ``results.json``, ``results.md``
    and, when matplotlib is installed, ``pareto_size.png`` / ``pareto_latency.png`` to ``out_dir``.

    ``data_spec``: ``{"manifest": path, "entry": name}`` (a zoo entry's data) or
    ``{"data": {kind = "npz", eval = ..., labels = ..., calib = ...}, "base": folder}``.
    """
    started = time.perf_counter()
    model_path = Path(model).resolve()
    if not model_path.is_file():
        raise ZooError(f"{model_path}: model not found")
    out = Path(out_dir)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    spec_json = json.dumps(dict(data_spec), sort_keys=True, default=str)
    data = _data_from_spec(spec_json)  # fail early on bad data, and the reference metric
    model_sha = _sha256(model_path)
    name = model_name or model_path.stem
    from onnxcomp.ort_session import session_from_path, session_options

    ref_sess = session_from_path(model_path, options=session_options(threads=threads))
    reference_metric = data.metric(
        lambda feed: ref_sess.run(None, feed), reference=lambda feed: ref_sess.run(None, feed)
    )

    rows: dict[str, dict[str, Any]] = {}
    tasks = []
    cached = 0
    points = grid.points()
    for p in points:
        key = hashlib.sha256(
            json.dumps([model_sha, recipe_hash(p.recipe), spec_json, __version__, _CACHE_SCHEMA]).encode()
        ).hexdigest()
        hit = cache / f"{key}.json"
        if hit.is_file():
            try:
                rows[p.label] = json.loads(hit.read_text(encoding="utf-8"))
                cached += 1
                continue
            except (OSError, json.JSONDecodeError):
                hit.unlink(missing_ok=True)
        tasks.append(
            {
                "model_path": str(model_path), "model_name": name, "recipe": p.recipe, "label": p.label,
                "values": p.values, "key": key, "data_spec": spec_json,
                "latency_repeats": latency_repeats, "threads": threads,
            }
        )  # fmt: skip
    total = len(points)

    def done(row: dict[str, Any]) -> None:
        rows[row["label"]] = row
        if not row.get("error"):
            _write_atomic(cache / f"{row['key']}.json", json.dumps(row, indent=1, default=str))
        if progress:
            state = f"error: {row['error']}" if row.get("error") else f"metric {row.get('metric')}"
            progress(f"[{len(rows)}/{total}] {row['label']}: {state}")

    if progress and cached:
        progress(f"{cached}/{total} points from the cache")
    if tasks:
        if ray_address:
            _run_ray(tasks, model_path, ray_address, done)
        else:
            _run_local(tasks, jobs or max(1, min(len(tasks), (os.cpu_count() or 2))), done)
    ordered = [rows[p.label] for p in points]
    for r in ordered:
        if r.get("metric") is not None and reference_metric is not None:
            r["metric_delta"] = r["metric"] - reference_metric
        if r.get("packed_bytes") and r.get("original_size_bytes"):
            r["compression_ratio"] = r["original_size_bytes"] / r["packed_bytes"]
    result = SweepResult(name, model_sha, grid, ordered, reference_metric, out, cached)
    result.seconds = time.perf_counter() - started
    _write_atomic(out / "results.json", json.dumps(result.as_dict(), indent=2, default=str))
    _write_atomic(out / "results.md", sweep_markdown(result))
    result.files = [out / "results.json", out / "results.md"]
    if plots:
        result.files += write_pareto_plots(result)
    return result


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    default_file_mode(tmp)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- tables


def _cell(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "kb":
        return f"{v / 1024:.1f} KB" if v < 1 << 20 else f"{v / (1 << 20):.2f} MB"
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:.4f}"


def pivot_table(
    rows: Sequence[Mapping[str, Any]], row_axis: str, col_axis: str, field_name: str, kind: str = "pct",
    *, col_suffix: str = "",
) -> str:  # fmt: skip
    """Markdown table of ``field_name`` with one row per ``row_axis`` value and one column per
    ``col_axis`` value (the layout of seed 003's Tables 1–3)."""
    row_vals: list[Any] = []
    col_vals: list[Any] = []
    cells: dict[tuple[Any, Any], Any] = {}
    for r in rows:
        rv, cv = r["values"].get(row_axis), r["values"].get(col_axis)
        if rv not in row_vals:
            row_vals.append(rv)
        if cv not in col_vals:
            col_vals.append(cv)
        cells[(rv, cv)] = r.get(field_name) if not r.get("error") else None
    head = (
        f"| {row_axis} \\ {col_axis} | " + " | ".join(f"{_fmt_value(c)}{col_suffix}" for c in col_vals) + " |"
    )
    lines = [head, "|---|" + "---:|" * len(col_vals)]
    for rv in row_vals:
        lines.append(
            f"| {_fmt_value(rv)} | " + " | ".join(_cell(cells.get((rv, c)), kind) for c in col_vals) + " |"
        )
    return "\n".join(lines)


def sweep_markdown(result: SweepResult) -> str:
    """The sweep as markdown: one row per point, then pivot tables when the grid has two axes."""
    axes = list(result.grid.axes)
    metric_name = next((r.get("metric_name") for r in result.rows if r.get("metric_name")), "metric")
    lines = [
        f"# Sweep `{result.grid.name}` on `{result.model}`",
        "",
        result.grid.description,
        "",
        f"Reference (original model) {metric_name}: {_cell(result.reference_metric, 'pct')}. "
        f"onnxcomp {__version__}; latency = median of interleaved runs, ratio to the original.",
        "",
        "| "
        + " | ".join(axes)
        + f" | {metric_name} | Δ | sparsity | size | packed | ratio | latency × | cosine | note |",
        "|" + "---|" * len(axes) + "---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.rows:
        vals = " | ".join(_fmt_value(r["values"].get(a)) for a in axes)
        lines.append(
            f"| {vals} | {_cell(r.get('metric'), 'pct')} | {_cell(r.get('metric_delta'), 'pct')} "
            f"| {_cell(r.get('sparsity'), 'pct')} | {_cell(r.get('size_bytes'), 'kb')} "
            f"| {_cell(r.get('packed_bytes'), 'kb')} | {_cell(r.get('compression_ratio'), 'x')} "
            f"| {_cell(r.get('latency_ratio'), 'x')} | {_cell(r.get('cosine'), 'f')} | {r.get('error') or ''} |"
        )
    if len(axes) == 2:
        a, b = axes
        for title, fld, kind in (
            (metric_name, "metric", "pct"),
            ("weight sparsity", "sparsity", "pct"),
            ("size, Deflate (zip level 9)", "deflate_bytes", "kb"),
            ("size, packed artifact", "packed_bytes", "kb"),
        ):
            lines += ["", f"**{title}**", "", pivot_table(result.rows, a, b, fld, kind)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal cost and higher-or-equal metric (cost, metric)."""
    front: list[tuple[float, float]] = []
    best = -float("inf")
    for cost, metric in sorted(points, key=lambda p: (p[0], -p[1])):
        if metric > best:
            front.append((cost, metric))
            best = metric
    return front


def write_pareto_plots(result: SweepResult) -> list[Path]:
    """``pareto_size.png`` (packed size vs metric) and ``pareto_latency.png`` (latency ratio vs metric);
    nothing when matplotlib is not installed (``pip install onnxcomp[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no Pareto plots (pip install onnxcomp[plot])")
        return []
    written = []
    ok = [r for r in result.rows if not r.get("error") and r.get("metric") is not None]
    for fld, xlabel, fname, scale in (
        ("packed_bytes", "packed artifact size (KiB)", "pareto_size.png", 1 / 1024),
        ("latency_ratio", "latency / original (interleaved medians)", "pareto_latency.png", 1.0),
    ):
        pts = [(r[fld] * scale, r["metric"], r["label"]) for r in ok if r.get(fld) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color="tab:blue", label="grid points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        ax.plot(
            [p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", ms=4, label="Pareto front"
        )
        for x, y, label in pts:
            if (x, y) in front:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if result.reference_metric is not None:
            ax.axhline(result.reference_metric, color="gray", lw=0.8, ls="--", label="original")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ok[0].get("metric_name") or "metric")
        ax.set_title(f"{result.grid.name} on {result.model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = result.out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
