"""``onnxcomp zoo list | run | check | update-baseline``: the model-zoo CI regression."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]

zoo_app = typer.Typer(
    help="Model zoo: run recipes on the models of a manifest and compare with recorded baselines.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ManifestOpt = Annotated[
    Path | None,
    typer.Option("--manifest", "-m", help="Zoo manifest (default: models/zoo.toml here or above)."),
]
ZooRootOpt = Annotated[
    str | None, typer.Option("--zoo-root", help="Folder of real models (default: the manifest's zoo_root).")
]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Entries to run (default: all, or --ci ones).")]
CiOpt = Annotated[bool, typer.Option("--ci", help="Only the entries marked ci = true.")]
RecipeOpt = Annotated[
    list[str] | None, typer.Option("--recipe", "-r", help="Only these recipes of each entry.")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]


def _echo_table(text: str) -> None:
    typer.echo(text)


def _run(manifest, names, ci, recipes, compare):
    from onnxcomp.zoo import run_entry

    checks = []
    for entry in manifest.select(names or (), ci=ci):
        checks += run_entry(
            manifest,
            entry,
            recipes=list(recipes or entry.recipes),
            compare=compare,
            progress=lambda msg: typer.echo(f"… {msg}", err=True),
        )
    return checks


def _write_json(path: Path | None, checks) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.as_dict() for c in checks], indent=2, default=str), encoding="utf-8")


@zoo_app.command("list")
def list_(manifest: ManifestOpt = None, zoo_root: ZooRootOpt = None) -> None:
    """List the entries of the manifest and whether their models are present."""
    from onnxcomp.zoo import ZooUnavailable, load_manifest

    man = load_manifest(manifest, zoo_root=zoo_root)
    rows = ["| model | source | metric | recipes | ci | present |", "|---|---|---|---|---|---|"]
    for e in man.entries.values():
        s = e.source
        if "pypi" in s:
            present = "pypi (fetched on use)"
        else:
            try:
                man.model_path(e)
                present = "yes"
            except ZooUnavailable:
                present = "no"
        rows.append(
            f"| {e.name} | {e.source_text()} | {e.metric} | {', '.join(e.recipes)} | {'yes' if e.ci else ''} | {present} |"
        )
    _echo_table("\n".join(rows))


@zoo_app.command()
def run(
    names: NamesArg = None,
    manifest: ManifestOpt = None,
    zoo_root: ZooRootOpt = None,
    ci: CiOpt = False,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Measure recipes on zoo models and print the table (no comparison with baselines)."""
    from onnxcomp.zoo import checks_table, load_manifest

    man = load_manifest(manifest, zoo_root=zoo_root)
    checks = _run(man, names, ci, recipe, compare=False)
    for c in checks:
        if c.status == "new":
            c.status, c.problems = "ok", []
    _echo_table(checks_table(checks))
    _write_json(json_out, checks)
    if any(c.status == "error" for c in checks):
        raise typer.Exit(1)


@zoo_app.command()
def check(
    names: NamesArg = None,
    manifest: ManifestOpt = None,
    zoo_root: ZooRootOpt = None,
    ci: CiOpt = False,
    recipe: RecipeOpt = None,
    json_out: JsonOpt = None,
    allow_new: Annotated[
        bool, typer.Option("--allow-new", help="Do not fail on recipes that have no recorded baseline.")
    ] = False,
    latency_margin: Annotated[
        float | None,
        typer.Option("--latency-margin", help="Override the manifest's latency noise margin (0.25 = 25 %)."),
    ] = None,
    no_latency: Annotated[
        bool, typer.Option("--no-latency", help="Skip the latency rule (noisy shared machines).")
    ] = False,
) -> None:
    """Compare with the recorded baselines; exit 1 on a metric drop, size growth, slowdown or error."""
    from onnxcomp.zoo import checks_table, load_manifest

    man = load_manifest(manifest, zoo_root=zoo_root)
    if latency_margin is not None:
        man.latency_margin = latency_margin
    if no_latency:
        man.latency_margin = float("inf")
    checks = _run(man, names, ci, recipe, compare=True)
    _echo_table(checks_table(checks))
    _write_json(json_out, checks)
    bad = [c for c in checks if c.status in ("FAIL", "error") or (c.status == "new" and not allow_new)]
    skipped = sum(c.status == "skipped" for c in checks)
    summary = f"{len(checks) - len(bad) - skipped} ok, {len(bad)} failed, {skipped} skipped"
    if bad:
        typer.echo(f"zoo check FAILED: {summary}", err=True)
        raise typer.Exit(1)
    typer.echo(f"zoo check passed: {summary}", err=True)


@zoo_app.command("update-baseline")
def update_baseline(
    names: NamesArg = None,
    manifest: ManifestOpt = None,
    zoo_root: ZooRootOpt = None,
    ci: CiOpt = False,
    recipe: RecipeOpt = None,
) -> None:
    """Measure and rewrite the recorded baselines in the manifest (review the diff before committing)."""
    from onnxcomp.zoo import checks_table, load_manifest, write_baselines

    man = load_manifest(manifest, zoo_root=zoo_root)
    checks = _run(man, names, ci, recipe, compare=False)
    n = write_baselines(man, checks)
    for c in checks:
        if c.status == "new":
            c.status, c.problems = "recorded", []
    _echo_table(checks_table(checks))
    typer.echo(f"recorded {n} baseline(s) in {man.path}", err=True)
    if any(c.status == "error" for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
