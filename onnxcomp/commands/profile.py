"""``onnxcomp profile``, ``onnxcomp compile``, ``onnxcomp targets`` and ``onnxcomp trt-check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxcomp.errors import OnnxcompError, TargetError

__all__ = ["register"]


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise TargetError(f"--batch must be comma-separated integers such as 1,8; got {text!r}") from exc
    if not values or any(b < 1 for b in values):
        raise TargetError(f"--batch sizes must be >= 1; got {text!r}")
    return values


def _single_shapes(spec: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    from onnxcomp.targets.trtexec import parse_shapes

    parsed = parse_shapes(spec)
    if not parsed:
        return None
    return {name: shapes[1] if len(shapes) == 3 else shapes[0] for name, shapes in parsed.items()}


def _emit(
    report: dict[str, Any],
    *,
    json_path: Path | None,
    markdown: Path | None,
    plots: Path | None,
    accuracy: Path | None,
    quiet_json: bool,
) -> None:
    from onnxcomp.targets.profile import report_to_markdown, write_report

    md = report_to_markdown(report)
    if json_path is not None:
        write_report(report, json_path)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(md, encoding="utf-8")
    if plots is not None:
        from onnxcomp.targets.plots import plot_report

        acc = None
        if accuracy is not None:
            try:
                acc = {str(k): float(v) for k, v in json.loads(accuracy.read_text(encoding="utf-8")).items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise OnnxcompError(
                    f"{accuracy}: expected a JSON object {{model name: accuracy}} ({exc})"
                ) from exc
        for p in plot_report(report, plots, accuracy=acc):
            typer.echo(f"wrote {p}", err=True)
    if not quiet_json:
        typer.echo(md)


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        models: Annotated[
            list[Path] | None, typer.Argument(help="Models to profile; the first is the baseline.")
        ] = None,
        target: Annotated[
            str | None,
            typer.Option(
                "--target", "-t", help="Target (`onnxcomp targets`); default ort-cpu, tensorrt on import."
            ),
        ] = None,
        threads: Annotated[
            int | None, typer.Option(help="Intra-op threads (default: ONNX Runtime's choice).")
        ] = None,
        opt_level: Annotated[
            str, typer.Option("--opt-level", help="disable, basic, extended or all.")
        ] = "all",
        batch: Annotated[str, typer.Option("--batch", help="Batch sizes for throughput, e.g. 1,8.")] = "1",
        data: Annotated[
            Path | None, typer.Option("--data", help=".npz of inputs (default: synthetic).")
        ] = None,
        shapes: Annotated[
            list[str] | None, typer.Option("--shapes", help="Input shapes NAME:1x3x224x224 (dynamic inputs).")
        ] = None,
        max_seconds: Annotated[float, typer.Option(help="Steady-state time cap per model (s).")] = 15.0,
        max_runs: Annotated[int, typer.Option(help="Steady-state run cap per model.")] = 2000,
        rel_ci: Annotated[
            float, typer.Option(help="Stop when the median's 95% CI is within this fraction.")
        ] = 0.05,
        op_runs: Annotated[
            int, typer.Option(help="Runs under ONNX Runtime's profiler (0: no op breakdown).")
        ] = 30,
        no_isolate: Annotated[
            bool, typer.Option("--no-isolate", help="Measure in this process (no per-model RSS).")
        ] = False,
        json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report here.")] = None,
        markdown: Annotated[
            Path | None, typer.Option("--markdown", help="Write the Markdown report here.")
        ] = None,
        plots: Annotated[
            Path | None, typer.Option("--plots", help="Write PNG plots into this folder.")
        ] = None,
        accuracy: Annotated[
            Path | None,
            typer.Option("--accuracy", help="JSON {model name: accuracy} for the trade-off plot."),
        ] = None,
        emit_trtexec: Annotated[
            bool, typer.Option("--emit-trtexec", help="Print the trtexec command to run on the device.")
        ] = False,
        out_dir: Annotated[
            str, typer.Option("--out-dir", help="Folder trtexec writes on the device.")
        ] = "trtexec-out",
        import_trtexec: Annotated[
            list[Path] | None, typer.Option("--import-trtexec", help="Read trtexec exports from this folder.")
        ] = None,
    ) -> None:
        """Latency (p50/p90/p99 until the median's CI is within 5%), start-up, throughput, peak RSS, energy and
        time per op type of one or more models, side by side; a compressed model slower than the first is flagged."""
        from onnxcomp.targets.registry import get_target

        tgt = get_target(target or ("tensorrt" if import_trtexec else "ort-cpu"))
        if import_trtexec:
            if tgt.runtime != "tensorrt":
                raise TargetError(
                    f"--import-trtexec reads TensorRT results; {tgt.name!r} is not a TensorRT target"
                )
            from onnxcomp.targets.trtexec import import_trtexec as do_import
            from onnxcomp.targets.trtexec import merge_reports

            model_list = list(models or [])
            if model_list and len(model_list) != len(import_trtexec):
                raise TargetError("give one MODEL per --import-trtexec folder (same order), or none")
            reports = [
                do_import(folder, model=model_list[i] if model_list else None, target=tgt)
                for i, folder in enumerate(import_trtexec)
            ]
            _emit(
                merge_reports(reports),
                json_path=json_path,
                markdown=markdown,
                plots=plots,
                accuracy=accuracy,
                quiet_json=False,
            )
            return
        if not models:
            raise TargetError("give at least one MODEL to profile (or --import-trtexec DIR)")
        if emit_trtexec:
            from onnxcomp.targets.trtexec import emit_script, parse_shapes, trtexec_command

            parsed = parse_shapes(shapes)
            for i, model in enumerate(models):
                folder = out_dir if len(models) == 1 else f"{out_dir.rstrip('/')}/{model.stem}-{i}"
                argv = trtexec_command(model, target=tgt, out_dir=folder, shapes=parsed)
                typer.echo(
                    emit_script(argv, out_dir=folder, tegrastats=tgt.name.startswith("jetson")), nl=False
                )
            return
        from onnxcomp.targets.profile import ProfileSettings, profile_models

        try:
            settings = ProfileSettings(
                threads=threads,
                optimization=opt_level,
                batches=_batches(batch),
                rel_ci=rel_ci,
                max_runs=max_runs,
                max_seconds=max_seconds,
                op_profile_runs=op_runs,
                isolate=not no_isolate,
                data=str(data) if data else None,
                shapes=_single_shapes(shapes),
            )
        except ValueError as exc:
            raise TargetError(str(exc)) from exc
        if data is not None and not data.is_file():
            raise TargetError(f"{data}: no such .npz file")
        report = profile_models(
            models, target=tgt, settings=settings, progress=lambda msg: typer.echo(msg, err=True)
        )
        _emit(
            report, json_path=json_path, markdown=markdown, plots=plots, accuracy=accuracy, quiet_json=False
        )

    @app.command("compile")
    def compile_(
        model: Annotated[Path, typer.Argument(help="Model to optimize for the runtime.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the optimized model.")],
        target: Annotated[str, typer.Option("--target", "-t", help="An ONNX Runtime target.")] = "ort-cpu",
        threads: Annotated[int | None, typer.Option(help="Intra-op threads.")] = None,
        opt_level: Annotated[
            str, typer.Option("--opt-level", help="basic, extended or all (all may be CPU-specific).")
        ] = "all",
        force: Annotated[bool, typer.Option("--force", help="Allow writing over the input path.")] = False,
    ) -> None:
        """Save ONNX Runtime's optimized graph (fusions, constant folding, layout) to OUTPUT."""
        from onnxcomp.targets.profile import compile_model

        info = compile_model(
            model, output, target=target, threads=threads, optimization=opt_level, force=force
        )
        before, after = sum(info["ops_before"].values()), sum(info["ops_after"].values())
        typer.echo(
            f"wrote {info['output']} ({info['output_bytes']:,} bytes, {after} nodes; input {info['input_bytes']:,} "
            f"bytes, {before} nodes) in {info['seconds']:.2f}s at optimization level {opt_level}"
        )
        top = ", ".join(f"{k} {v}" for k, v in list(info["ops_after"].items())[:8])
        typer.echo(f"ops after: {top}")

    @app.command("targets")
    def targets(
        name: Annotated[str | None, typer.Argument(help="Show one target in full.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """List deployment targets: precisions, whether int8 is fast, and the quantization settings they want."""
        from onnxcomp.targets.registry import available_targets, get_target

        names = [name] if name else list(available_targets())
        resolved = [get_target(n) for n in names]
        if as_json:
            typer.echo(json.dumps([t.as_dict() for t in resolved], indent=2))
            return
        for t in resolved:
            q = f"{t.quant_format} act={t.activation_dtype}{' sym' if t.activation_symmetric else ''}"
            q += f" reduce_range={'yes' if t.reduce_range else 'no'} bias={'int32' if t.quantize_bias else 'float'}"
            opset = f"opset {t.opset_min}..{t.opset_max}" if t.opset_max else f"opset {t.opset_min}+"
            typer.echo(
                f"{t.name:14} {', '.join(t.precisions):22} int8 {'fast' if t.int8_fast else 'not fast':8} {q}; {opset}"
            )
            typer.echo(f"{'':14} {t.description}")
            if name:
                for note in t.notes:
                    typer.echo(f"{'':14} - {note}")

    @app.command("trt-check")
    def trt_check(
        model: Annotated[Path, typer.Argument(help="ONNX model to check.")],
        target: Annotated[
            str, typer.Option("--target", "-t", help="tensorrt or a jetson-* profile.")
        ] = "tensorrt",
        trt_version: Annotated[
            str | None, typer.Option("--trt-version", help="TensorRT version, e.g. 8.2.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Will MODEL build with TensorRT? Parser ops and opset, QDQ rules, dynamic shapes, GPU precisions."""
        from onnxcomp.targets.registry import get_target
        from onnxcomp.targets.tensorrt import check_compat

        table: dict[str, Any] = {"name": target}
        if trt_version:
            table["trt_version"] = trt_version
        tgt = get_target(table)
        if tgt.runtime != "tensorrt":
            raise TargetError(f"trt-check needs a TensorRT target (tensorrt, jetson-*); got {target!r}")
        issues = check_compat(model, tgt.trt_version or "8.6", target=tgt)
        if as_json:
            typer.echo(json.dumps([i.as_dict() for i in issues], indent=2))
        else:
            for issue in issues:
                typer.echo(str(issue))
            errors = sum(i.severity == "error" for i in issues)
            typer.echo(
                f"{model}: {errors} error(s), {len(issues) - errors} other finding(s) for {tgt.description}"
            )
        if any(i.severity == "error" for i in issues):
            raise typer.Exit(1)
