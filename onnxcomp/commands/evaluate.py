"""``onnxcomp evaluate REFERENCE CANDIDATE --data DATA [--labels FILE]``: fidelity and accuracy side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxcomp.errors import RecipeError

__all__ = ["register"]


def _data_table(data: str, recipe: str | None, options: list[str]) -> dict[str, Any]:
    """The data spec: the recipe's [calibration] table (preprocessing), then ``--set key=value``."""
    from onnxcomp.recipe import _parse_value, read_recipe_data

    table: dict[str, Any] = {}
    if recipe is not None:
        raw, _ = read_recipe_data(recipe)
        section = raw.get("calibration", {})
        if not isinstance(section, dict):
            raise RecipeError(f"{recipe}: [calibration] must be a table")
        table.update(section)
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"--set {item!r}: expected key=value, e.g. --set resize=[256] or --set layout=NHWC"
            )
        key = key.strip()
        if key.startswith("calibration."):
            key = key[len("calibration.") :]
        table[key] = _parse_value(value.strip())
    table["data"] = data
    return table


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}f}"
    return str(v)


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(
        f"[bold]{result['candidate']}[/bold] vs {result['reference']} on {result['samples']} samples of {result['data']}"
    )
    t = Table(title="fidelity per output", show_edge=False)
    for col in ("output", "top-1 agreement", "cosine", "SQNR dB", "max |err|"):
        t.add_column(col)
    for name, m in result["outputs"].items():
        sq = m["sqnr_db"]
        t.add_row(
            name,
            _fmt(m["top1_agreement"]),
            _fmt(m["cosine"], 6),
            sq if isinstance(sq, str) else _fmt(sq, 2),
            _fmt(m["max_abs"], 6),
        )
    con.print(t)
    cls = result.get("classification")
    if cls:
        t = Table(
            title=f"classification ({cls['output']}, {cls['reference']['rows']} labelled rows)",
            show_edge=False,
        )
        for col in ("metric", "reference", "candidate", "delta"):
            t.add_column(col)
        for key in cls["delta"]:
            t.add_row(
                key, _fmt(cls["reference"][key]), _fmt(cls["candidate"][key]), f"{cls['delta'][key]:+.4f}"
            )
        con.print(t)
    lat = result["latency_ms"]
    con.print(
        f"median latency per sample: reference {lat['reference']:.3f} ms, candidate {lat['candidate']:.3f} ms"
    )


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        reference: Annotated[Path, typer.Argument(help="Reference model (e.g. the FP32 original).")],
        candidate: Annotated[Path, typer.Argument(help="Candidate model (e.g. the compressed one).")],
        data: Annotated[
            str,
            typer.Option(
                "--data", help="Evaluation data: .npz/.npy, image folder, test_data_set folder (see --set)."
            ),
        ],
        labels: Annotated[
            Path | None, typer.Option("--labels", help="Integer labels (.npy/.txt/.csv), one per data row.")
        ] = None,
        output: Annotated[
            str | None,
            typer.Option("--output", help="Classifier output to score (default: the first [N, C])."),
        ] = None,
        top_k: Annotated[
            list[int] | None, typer.Option("--top-k", help="Top-k accuracies to report.")
        ] = None,
        skip: Annotated[
            int, typer.Option("--skip", help="Leave out the first N samples (e.g. calibration).")
        ] = 0,
        max_samples: Annotated[
            int | None, typer.Option("--max-samples", help="Evaluate at most N samples.")
        ] = None,
        recipe: Annotated[
            str | None, typer.Option("--recipe", "-r", help="Take the data preprocessing from this recipe.")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set", help="Data/preprocessing option key=value (resize=[256], layout=NHWC, ...)."
            ),
        ] = None,
        threads: Annotated[
            int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Compare CANDIDATE with REFERENCE on real data: per-output fidelity (top-1 agreement, cosine,
        SQNR, max error) and, with --labels, accuracy, macro precision/recall/F1 and top-k of both."""
        from onnxcomp.cli import progress_for
        from onnxcomp.evaluate import evaluate as run_evaluate

        if max_samples is not None and max_samples < 1:
            raise RecipeError(f"--max-samples must be >= 1, got {max_samples}")
        result = run_evaluate(
            reference,
            candidate,
            _data_table(data, recipe, set_ or []),
            labels=labels,
            skip=skip,
            max_samples=max_samples,
            output=output,
            top_k=tuple(top_k or (1, 5)),
            threads=threads,
            progress=progress_for(not as_json),
        ).as_dict()
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            _print(result)
