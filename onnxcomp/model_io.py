"""Model I/O on onnx-ir: validated loading (external data memory-mapped), atomic saving.

Loading never copies weights: external data stays memory-mapped until a pass replaces a tensor, and
so do the inline weights of binary models of 2 MB and more (:mod:`onnxcomp.proto_stream` parses only
the graph and maps the tensor bytes in place); such models are also saved by streaming each weight
straight from its buffer (untouched ones file-to-file), with no protobuf copy of the weights.
Saving goes to a temporary folder beside the destination and is renamed into place only when the
caller commits, so a failed run leaves nothing behind and the input is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.errors import ModelLoadError, OutputError
from onnxcomp.proto_stream import FileSpanTensor, load_mmap, write_model

__all__ = [
    "MIN_OPSET",
    "StagedModel",
    "check_no_nan_weights",
    "check_output_path",
    "external_tensors",
    "iter_graphs",
    "load_model",
    "max_opset",
    "save_model",
    "staged_save",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
#: Models whose weights exceed this many bytes are saved with external data (protobuf caps at 2 GiB).
DEFAULT_EXTERNAL_DATA_OVER = 1 << 30
#: With external data, tensors at least this large go to the data file.
EXTERNAL_TENSOR_MIN_BYTES = 1024
#: Binary models at least this large load with memory-mapped weights (:mod:`onnxcomp.proto_stream`).
MMAP_LOAD_MIN_BYTES = 2 << 20
#: Models with at least this many bytes of weights are saved by streaming them (no protobuf copies).
STREAM_SAVE_MIN_BYTES = 1 << 20
_TEXT_FORMATS = {".textproto": "textproto", ".json": "json", ".onnxtxt": "onnxtxt"}


def max_opset() -> int:
    """Newest default-domain opset the installed onnx package knows."""
    return onnx.defs.onnx_opset_version()


def iter_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield model.graph
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield attr.value
                    stack.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        yield sub
                        stack.append(sub)


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor of the model that lives in an external data file."""
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value


def _check_external_data(model: ir.Model, model_path: Path) -> None:
    base = model_path.parent.resolve()
    for tensor in external_tensors(model):
        location = str(tensor.location)
        if os.path.isabs(location) or Path(location).is_absolute():
            raise ModelLoadError(
                f"{model_path}: tensor {tensor.name!r} points to external data at the absolute path "
                f"{location!r}; external data must sit in the model's folder (re-save it with a relative location)"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"{model_path}: tensor {tensor.name!r} points to external data {location!r} outside the "
                "model's folder; move the data file beside the model and re-save it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{model_path}: external data file {location!r} for tensor {tensor.name!r} is missing; "
                "copy it into the model's folder"
            )
        size = target.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else 0)
        if end > size:
            raise ModelLoadError(
                f"{model_path}: external data file {location!r} is truncated ({size} bytes, tensor "
                f"{tensor.name!r} needs {end}); copy the complete file"
            )


def _check_opsets(model: ir.Model, model_path: Path) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        return
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{model_path}: opset {opset} is older than the oldest supported ({MIN_OPSET}); upgrade it with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    if opset > max_opset():
        raise ModelLoadError(
            f"{model_path}: opset {opset} is newer than the installed onnx knows ({max_opset()}); "
            "upgrade onnx (pip install -U onnx)"
        )


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load and validate an ONNX model; external data is memory-mapped, never copied.

    Raises :class:`ModelLoadError` with a one-line message for anything that is not a loadable model.
    """
    model_path = Path(path)
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file; check the path")
    if model_path.is_dir():
        raise ModelLoadError(f"{model_path}: is a folder, not an .onnx file; pass the model file inside it")
    if model_path.stat().st_size == 0:
        raise ModelLoadError(f"{model_path}: the file is empty; re-export or re-download the model")
    fmt = _TEXT_FORMATS.get(model_path.suffix.lower(), "protobuf")
    try:
        model = None
        if fmt == "protobuf" and model_path.stat().st_size >= MMAP_LOAD_MIN_BYTES:
            try:  # weights memory-mapped, no protobuf copy; anything unusual takes ir.load's path
                model = load_mmap(model_path)
            except Exception:
                model = None
        if model is None:
            model = ir.load(model_path, format=fmt)
    except Exception as exc:
        raise ModelLoadError(
            f"{model_path}: not a readable ONNX model ({type(exc).__name__}); the file is truncated, "
            "corrupt or not ONNX — re-export or re-download it"
        ) from exc
    if model.ir_version <= 0 or (len(model.graph.outputs) == 0 and len(model.graph) == 0):
        raise ModelLoadError(
            f"{model_path}: not an ONNX model (no IR version or an empty graph); re-export or re-download it"
        )
    _check_opsets(model, model_path)
    _check_external_data(model, model_path)
    logger.debug("loaded %s (IR %d, %d nodes)", model_path, model.ir_version, len(model.graph))
    return model


def check_output_path(
    output: str | os.PathLike[str], *, inputs: tuple[Path, ...] = (), force: bool = False
) -> Path:
    """Validate an output path before any work starts: not an input (unless ``force``), folder writable."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as {out / 'model.onnx'}")
    for src in inputs:
        same = out.resolve() == src.resolve() or (
            out.exists() and src.exists() and os.path.samefile(out, src)
        )
        if same and not force:
            raise OutputError(
                f"{out}: refusing to overwrite the input model; choose another -o path or pass --force"
            )
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{out}: cannot create the output folder ({existing} is not a folder)")
    try:
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".onnxcomp-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(
            f"{out}: the output folder {existing} is not writable ({exc.strerror}); choose another -o path"
        ) from exc
    return out


def _weight_bytes(model: ir.Model) -> int:
    total = 0
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


@dataclass
class StagedModel:
    """A model written to a temporary folder, waiting to be verified and committed."""

    path: Path
    destination: Path
    external_data: str | None
    _tmpdir: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self._tmpdir.iterdir() if p.is_file())

    def size_bytes(self) -> int:
        """Bytes on disk of the model file plus its external data."""
        return sum(p.stat().st_size for p in self.files())

    def commit(self) -> Path:
        """Move the staged files into place (external data first, then the model file)."""
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        model_name = self.path.name
        for item in self.files():
            if item.name != model_name:
                os.replace(item, self.destination.parent / item.name)
        os.replace(self.path, self.destination)
        return self.destination


def _normalize_ir_version(model: ir.Model) -> None:
    """IR < 4 requires every initializer to be a graph input; passes add plain initializers, so raise
    the IR version to 4 (same semantics otherwise) when some initializer is not an input."""
    if model.ir_version >= 4:
        return
    for graph in iter_graphs(model):
        inputs = {v.name for v in graph.inputs}
        if any(name not in inputs for name in graph.initializers):
            model.ir_version = 4
            return


def _save_into(model: ir.Model, path: Path, external: str | None) -> None:
    _normalize_ir_version(model)
    try:
        if external:
            ir.save(model, path, external_data=external, size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES)
        elif path.suffix.lower() not in _TEXT_FORMATS and _weight_bytes(model) >= STREAM_SAVE_MIN_BYTES:
            # weights written straight from their buffers (external data included): no proto copies
            write_model(model, path)
        else:
            if next(external_tensors(model), None) is not None:
                # a single-file output must not keep pointing at the input's data file
                ir.external_data.load_to_model(model)
            ir.save(model, path)
    except OSError as exc:
        raise OutputError(f"{path.parent}: could not write the model ({exc.strerror})") from exc


@contextlib.contextmanager
def staged_save(
    model: ir.Model,
    destination: str | os.PathLike[str],
    *,
    external_data: str = "auto",
    external_data_over: int = DEFAULT_EXTERNAL_DATA_OVER,
) -> Iterator[StagedModel]:
    """Write ``model`` to a temporary folder beside ``destination``; yields it for verification.

    Nothing reaches ``destination`` unless the caller calls :meth:`StagedModel.commit`; on any exit
    the temporary folder is removed. ``external_data`` is ``"auto"`` (above ``external_data_over`` bytes
    of weights), ``"always"`` or ``"never"``.
    """
    dest = Path(destination)
    if external_data not in {"auto", "always", "never"}:
        raise OutputError(f"output.external_data must be one of auto, always, never; got {external_data!r}")
    use_external = external_data == "always" or (
        external_data == "auto" and _weight_bytes(model) > external_data_over
    )
    existing = dest.parent
    while not existing.exists():
        existing = existing.parent
    tmpdir = Path(tempfile.mkdtemp(dir=existing, prefix=".onnxcomp-"))
    try:
        staged_path = tmpdir / dest.name
        data_name = f"{dest.name}.data" if use_external else None
        _save_into(model, staged_path, data_name)
        yield StagedModel(path=staged_path, destination=dest, external_data=data_name, _tmpdir=tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: str = "auto",
    external_data_over: int = DEFAULT_EXTERNAL_DATA_OVER,
) -> Path:
    """Atomically save ``model`` (temp folder + rename, external data too)."""
    with staged_save(
        model, path, external_data=external_data, external_data_over=external_data_over
    ) as staged:
        return staged.commit()


def check_no_nan_weights(model: ir.Model, *, source: str = "model") -> None:
    """Refuse float weights holding NaN (Inf is allowed: attention masks use it legitimately)."""
    for graph in iter_graphs(model):
        tensors = [(v.name, v.const_value) for v in graph.initializers.values() if v.const_value is not None]
        for node in graph:
            if node.op_type == "Constant":
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    tensors.append((node.outputs[0].name, attr.value))
        for name, tensor in tensors:
            if not tensor.dtype.is_floating_point():
                continue
            try:
                array = tensor.numpy()
            except Exception:  # exotic float types numpy cannot view (e.g. float4): skip
                continue
            count = int(np.count_nonzero(np.isnan(array.astype(np.float32, copy=False))))
            del array
            if isinstance(tensor, ir.ExternalTensor | FileSpanTensor):
                tensor.release()  # drop the mapping: checking must not keep gigabytes resident
            if count:
                raise ModelLoadError(
                    f"{source}: weight {name!r} holds {count} NaN value(s); fix or re-export the model "
                    "(compressing NaN weights would give meaningless results)"
                )
