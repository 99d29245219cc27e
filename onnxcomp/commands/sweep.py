"""``onnxcomp sweep MODEL --grid GRID -o DIR``: a grid of recipes, a table and Pareto plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]


def sweep(
    model: Annotated[str, typer.Argument(help="An .onnx file, or the name of a zoo entry (uses its data).")],
    grid: Annotated[
        str, typer.Option("--grid", "-g", help="Grid TOML file or a built-in grid: seed003, seed001.")
    ],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for results, plots and the cache.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluation inputs .npz (keys = model input names).")
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="Labels .npy for --data (top-1).")] = None,
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Calibration inputs .npz (never the evaluation data).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", "-m", help="Zoo manifest for MODEL given as an entry name.")
    ] = None,
    zoo_root: Annotated[str | None, typer.Option("--zoo-root", help="Folder of real zoo models.")] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="Local worker processes (default: CPU count).")
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="Distribute over Ray: a cluster address, 'auto', or 'local'."),
    ] = None,
    latency_repeats: Annotated[int, typer.Option(help="Interleaved timing runs per point.")] = 20,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads per point.")] = 1,
) -> None:
    """Run every recipe of a grid on MODEL; write results.md, results.json and Pareto plots to -o DIR.

    Points are cached per (model hash, recipe hash, onnxcomp version): rerun to resume.
    """
    from onnxcomp.sweep import load_grid, run_sweep
    from onnxcomp.zoo import ZooError, load_manifest

    g = load_grid(grid)
    spec: dict[str, Any]
    path = Path(model)
    if path.is_file():
        if data is None:
            raise ZooError(
                "a sweep on a model file needs --data EVAL.npz (and --labels LABELS.npy for top-1)"
            )
        table: dict[str, Any] = {"kind": "npz", "eval": str(data.resolve())}
        if labels is not None:
            table["labels"] = str(labels.resolve())
        if calib is not None:
            table["calib"] = str(calib.resolve())
        spec = {"data": table, "base": str(Path.cwd())}
        name = path.stem
    else:
        man = load_manifest(manifest, zoo_root=zoo_root)
        entry = man.entry(model)
        path = man.model_path(entry)
        spec = {"manifest": str(man.path.resolve()), "entry": entry.name, "zoo_root": str(man.zoo_root)}
        name = entry.name
    result = run_sweep(
        path,
        g,
        data_spec=spec,
        out_dir=out,
        model_name=name,
        jobs=jobs,
        ray_address=ray,
        latency_repeats=latency_repeats,
        threads=threads,
        progress=lambda msg: typer.echo(msg, err=True),
    )
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    errors = [r for r in result.rows if r.get("error")]
    typer.echo(
        f"{len(result.rows)} points ({result.cached} cached, {len(errors)} failed) in {result.seconds:.1f} s; "
        f"wrote {', '.join(str(f) for f in result.files)}",
        err=True,
    )


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
