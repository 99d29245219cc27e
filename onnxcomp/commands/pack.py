"""``onnxcomp pack MODEL -o ARTIFACT`` and ``onnxcomp unpack ARTIFACT -o DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def pack(
    model: Annotated[Path, typer.Argument(help="Input .onnx model (external data beside it is included).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Artifact to write (a zip, e.g. model.onnxcomp.zip).")
    ],
    codec: Annotated[
        str, typer.Option("--codec", help="deflate (default), zstd, lzma or store.")
    ] = "deflate",
    level: Annotated[int, typer.Option("--level", help="Compression level (deflate 0-9, zstd 1-22).")] = 9,
    sparse: Annotated[
        str | None,
        typer.Option(
            "--sparse", help="Sparse layout for pruned weights: auto, csr, csc, bitmask (default off)."
        ),
    ] = None,
    nibble: Annotated[
        bool | None,
        typer.Option(
            "--nibble/--no-nibble",
            help="Store int8 codes that fit 4 bits two per byte (--no-nibble: keep int4 packing as is).",
        ),
    ] = None,
    no_narrow: Annotated[
        bool, typer.Option("--no-narrow", help="Keep weights as they are (no int/fp16 narrowing).")
    ] = False,
    keep_names: Annotated[
        bool,
        typer.Option(
            "--keep-names",
            help="Keep every value's name (default: short names, except model inputs/outputs).",
        ),
    ] = False,
    names_map: Annotated[
        Path | None,
        typer.Option("--names-map", help="Write the JSON map original name -> name in the artifact here."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON report instead of a table.")
    ] = False,
) -> None:
    """Pack a model into one compressed artifact with a checksummed manifest."""
    from onnxcomp.config import from_mapping
    from onnxcomp.errors import OutputError
    from onnxcomp.model_io import check_output_path
    from onnxcomp.packing import PackConfig, pack_model

    config = from_mapping(
        PackConfig,
        {
            "codec": codec,
            "level": level,
            "sparse": sparse,
            "nibble": nibble,
            "narrow": not no_narrow,
            "rename": not keep_names,
        },
        where="pack",
    )
    if output.resolve() == model.resolve():
        raise OutputError(f"{output}: refusing to overwrite the input model; choose another -o path")
    check_output_path(output, inputs=(model,))
    report = pack_model(model, output, config=config)
    if names_map is not None:
        names_map.write_text(json.dumps(report.names, indent=1))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(report.to_markdown())


def unpack_cmd(
    artifact: Annotated[Path, typer.Argument(help="Packed artifact written by `onnxcomp pack`.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to create (must not exist or be empty).")
    ],
) -> None:
    """Write the plain .onnx model (and its data file) of an artifact, after checking every checksum."""
    from onnxcomp.runtime import unpack

    path = unpack(artifact, output)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("pack")(pack)
    app.command("unpack")(unpack_cmd)
