"""The ``onnxcomp`` command line.

Every user error is one line on stderr and exit code 2 (a traceback only with ``--debug``). Commands
beyond ``optimize`` and ``inspect`` live in ``onnxcomp/commands/`` and are discovered automatically.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from onnxcomp import __version__
from onnxcomp.errors import OnnxcompError

__all__ = ["app", "main"]

app = typer.Typer(
    name="onnxcomp",
    help="Post-training compression for ONNX models: prune, quantize, factorize, pack — verified and profiled.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state = {"debug": False}
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnxcomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each step does.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def progress_for(enabled: bool = True) -> Any:
    from onnxcomp.progress import default_progress

    return default_progress(enabled)


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="Input .onnx model (never modified).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output .onnx (default: MODEL.onnxcomp.onnx beside it)."),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="Recipe TOML file or built-in recipe name.")
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Deployment target, e.g. ort-cpu.")
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration data (.npz/.npy, image folder, test_data_set folder)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: section.key=value or passes.NAME.key=value."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the JSON report to this file.")
    ] = None,
    pack: Annotated[
        Path | None, typer.Option("--pack", help="Also write a packed artifact (.zip) here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of tables.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow writing over the input path.")] = False,
) -> None:
    """Compress MODEL with a recipe (default: the best safe one for the data given), verify, write."""
    from onnxcomp.api import optimize as run_optimize
    from onnxcomp.report import print_optimize_report

    result = run_optimize(
        model,
        output=output,
        recipe=recipe,
        target=target,
        calib=calib,
        overrides=set_ or [],
        force=force,
        pack=pack,
        report_path=report,
        progress=progress_for(not as_json),
    )
    if as_json:
        typer.echo(json.dumps(result.report, indent=2, default=str))
    else:
        print_optimize_report(result.report, Console())


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Model to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    top: Annotated[int, typer.Option(help="How many of the largest tensors to list.")] = 10,
) -> None:
    """IR/opsets, inputs/outputs, op histogram, parameters and bytes per op type and dtype, largest
    tensors, and where the weights live."""
    from onnxcomp.inspect_model import inspect_model

    info = inspect_model(model, top=top)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    _print_inspect(info)


def _print_inspect(info: dict[str, Any]) -> None:
    from rich.table import Table

    from onnxcomp.report import format_bytes

    con = Console()
    opsets = ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
    con.print(
        f"[bold]{info['path']}[/bold]  IR {info['ir_version']}, opsets: {opsets}, producer: {info['producer']}"
    )
    con.print(
        f"{info['nodes']} nodes, {info['parameters']:,} parameters, {format_bytes(info['weight_bytes'])} of weights, "
        f"file {format_bytes(info['file_bytes'])}, {info['subgraphs']} subgraphs"
    )
    t = Table(title="inputs / outputs", show_edge=False)
    for col in ("kind", "name", "dtype", "shape"):
        t.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            t.add_row(kind[:-1], v["name"], str(v["dtype"]), str(v["shape"]))
    con.print(t)
    t = Table(title="op types", show_edge=False)
    for col in ("op", "count", "parameters", "bytes"):
        t.add_column(col)
    for op, count in info["op_types"].items():
        pb = info["per_op_type"].get(op, {"parameters": 0, "bytes": 0})
        t.add_row(op, str(count), f"{pb['parameters']:,}", format_bytes(pb["bytes"]))
    con.print(t)
    t = Table(title="dtypes", show_edge=False)
    for col in ("dtype", "tensors", "parameters", "bytes"):
        t.add_column(col)
    for dt, v in info["per_dtype"].items():
        t.add_row(dt, str(v["tensors"]), f"{v['parameters']:,}", format_bytes(v["bytes"]))
    con.print(t)
    t = Table(title="largest tensors", show_edge=False)
    for col in ("name", "dtype", "shape", "bytes", "where"):
        t.add_column(col)
    for v in info["largest_tensors"]:
        t.add_row(v["name"], v["dtype"], str(v["shape"]), format_bytes(v["bytes"]), v["where"])
    con.print(t)
    loc = ", ".join(
        f"{k}: {v['tensors']} ({format_bytes(v['bytes'])})" for k, v in info["weights_location"].items()
    )
    con.print(f"weights live in: {loc}")
    if info["external_files"]:
        con.print(f"external data files: {', '.join(info['external_files'])}")


@app.command("passes")
def list_passes() -> None:
    """List the passes recipes can use, with their options."""
    import dataclasses

    from onnxcomp.pass_base import available_passes

    for name, cls in available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name}: {doc}")
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else "..."
            typer.echo(f"    {f.name} = {default!r}")


@app.command("recipes")
def list_recipes() -> None:
    """List the built-in recipes (use them with --recipe NAME)."""
    from onnxcomp.recipe import builtin_recipes, read_recipe_data

    for name, path in builtin_recipes().items():
        data, _ = read_recipe_data(path)
        typer.echo(f"{name}: {data.get('description', '')}")


def _discover_commands() -> None:
    import onnxcomp.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"onnxcomp.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_discover_commands()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (exits when called without ``argv``)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="onnxcomp")
        code = 0
    except SystemExit as exc:  # typer's normal exit path (usage errors: 2, --help: 0)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OnnxcompError as exc:
        if debug:
            err_console.print_exception()
        err_console.print(f"error: {_one_line(exc)}", highlight=False, markup=False, soft_wrap=True)
        code = 2
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written", markup=False)
        code = 130
    except Exception as exc:
        if debug:
            err_console.print_exception()
        err_console.print(
            f"internal error: {type(exc).__name__}: {_one_line(exc)} (please report it; rerun with --debug for a traceback)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        code = 3
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
