"""Calibration sample sources: each an iterable of ``{input_name: ndarray}`` validated against the model.

Kinds (``[calibration] kind``, detected from ``data`` when ``auto``):

- ``npz``: keys are input names. An array with the input's rank holds a batch along axis 0, split into
  samples of the model's batch size (fixed batch dim, else ``batch_size`` rows); rank + 1 is a stack of
  samples; rank - 1 is one unbatched sample. Arrays are read row block by row block from the archive.
- ``npy``: one array for ``input_name`` (or the only input), same rules, memory-mapped.
- ``test-data``: ONNX ``test_data_set_*/input_N.pb`` folders, one sample per set.
- ``images``: an image folder, preprocessed by an explicit spec (``onnxcomp.calibration.preprocess``).
- ``function``: ``file.py:fn`` returning an iterable of samples; runs user code, so only when asked for.
- ``synthetic``: random data from the declared shapes (dynamic dims -> 1); a warning says results will
  be poor.

A ``SampleSource`` re-reads its data on every iteration and never holds all samples; ``split(holdout)``
keeps the first ``holdout`` samples apart for verification and calibrates on the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx_ir as ir

from onnxcomp.calibration.config import CalibrationConfig
from onnxcomp.calibration.preprocess import ImageSpec, list_images, load_image
from onnxcomp.errors import CalibrationError

__all__ = [
    "InputSpec",
    "SampleSource",
    "SizedSampleSource",
    "detect_kind",
    "model_input_specs",
    "open_source",
    "validate_sample",
]

logger = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
Dim = int | str | None


# ----------------------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    """One model input: numpy dtype, dims (int fixed, str/None dynamic; ``None`` shape = unknown rank)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[Dim, ...] | None
    optional: bool = False  # an initializer also listed as a graph input (IR < 4): may be omitted

    def describe(self) -> str:
        dt = self.dtype.name if self.dtype is not None else "?"
        if self.shape is None:
            return f"{dt}[?]"
        return f"{dt}[{','.join('?' if d is None else str(d) for d in self.shape)}]"

    @property
    def batch(self) -> int | None:
        """The fixed leading dim, or ``None`` when it is dynamic (or the input is a scalar)."""
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None


def model_input_specs(model: ir.Model) -> dict[str, InputSpec]:
    """The model's graph inputs with numpy dtypes and dims."""
    specs: dict[str, InputSpec] = {}
    for value in model.graph.inputs:
        dtype = None
        if value.dtype is not None:
            with contextlib.suppress(Exception):
                dtype = np.dtype(value.dtype.numpy())
        shape = None
        if value.shape is not None:
            # exporters write -1 (or 0) for "any size": those dims are dynamic, not fixed
            shape = tuple(
                (d if d > 0 else None) if isinstance(d, int) else getattr(d, "value", None)
                for d in value.shape
            )
        specs[value.name] = InputSpec(value.name, dtype, shape, value.name in model.graph.initializers)
    return specs


def _required(specs: Mapping[str, InputSpec]) -> list[InputSpec]:
    return [s for s in specs.values() if not s.optional]


def validate_sample(sample: Any, specs: Mapping[str, InputSpec], *, where: str) -> Sample:
    """Check names, rank, dtype and fixed dims of one sample; return it as a dict of arrays."""
    if not isinstance(sample, Mapping):
        raise CalibrationError(
            f"{where} is a {type(sample).__name__}, expected a mapping of input name -> array"
        )
    extra = [k for k in sample if k not in specs]
    if extra:
        names = ", ".join(s.name for s in _required(specs))
        raise CalibrationError(
            f"{where} has input {extra[0]!r} that the model does not have; model inputs: {names}"
        )
    for spec in _required(specs):
        if spec.name not in sample:
            raise CalibrationError(f"{where} lacks input {spec.name!r} ({spec.describe()})")
    out: Sample = {}
    symbols: dict[str, tuple[int, str]] = {}
    for name, raw in sample.items():
        spec = specs[name]
        arr = raw if isinstance(raw, np.ndarray) else np.asarray(raw)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise CalibrationError(
                f"input {name!r} expects {spec.dtype.name}, got {arr.dtype.name} in {where} "
                f"(convert the data with .astype(np.{spec.dtype.name}))"
            )
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise CalibrationError(
                    f"input {name!r} expects rank {len(spec.shape)} {spec.describe()}, got rank {arr.ndim} "
                    f"{list(arr.shape)} in {where}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise CalibrationError(
                        f"input {name!r} dim {axis} must be {want}, got {got} in {where} "
                        f"(shape {list(arr.shape)}, model expects {spec.describe()})"
                    )
                if (
                    isinstance(want, str) and want.isidentifier()
                ):  # '?', '-1', 'unk__0' style names bind nothing
                    seen = symbols.get(want)
                    if seen is not None and seen[0] != got:
                        raise CalibrationError(
                            f"inputs {seen[1]!r} and {name!r} disagree on dim {want!r}: {seen[0]} vs {got} in {where}"
                        )
                    symbols.setdefault(want, (got, name))
        out[name] = arr
    return out


# ---------------------------------------------------------------------------------------------- readers


class _Reader:
    """Produces raw samples from ``start``; ``length`` is the number of samples when known."""

    length: int | None = None
    label: str = "data"

    def iter_from(self, start: int) -> Iterator[Sample]:
        raise NotImplementedError


class _ArrayMember:
    """One array of an .npy file or an .npz member, read in blocks of rows without loading it whole."""

    def __init__(self, opener: Callable[[], IO[bytes]], label: str) -> None:
        self.opener = opener
        self.label = label
        with opener() as f:
            self.shape, self.fortran, self.dtype = self._header(f)

    def _header(self, f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as exc:
            raise CalibrationError(f"{self.label}: not a valid .npy array ({exc})") from exc
        return tuple(shape), bool(fortran), np.dtype(dtype)

    def blocks(self, rows: int, start: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of ``rows`` rows along axis 0, from block ``start`` (ragged tail dropped)."""
        n = self.shape[0] // rows
        with self.opener() as f:
            self._header(f)
            if self.fortran or self.dtype.hasobject:
                arr = np.lib.format.read_array(f, allow_pickle=False)
                for k in range(start, n):
                    yield np.ascontiguousarray(arr[k * rows : (k + 1) * rows])
                return
            row_shape = self.shape[1:]
            block_bytes = rows * math.prod(row_shape) * self.dtype.itemsize
            if start:
                f.seek(start * block_bytes, 1)
            for _ in range(start, n):
                buf = bytearray(block_bytes)
                got = f.readinto(buf) if hasattr(f, "readinto") else None
                if got is None:
                    data = f.read(block_bytes)
                    got, buf = len(data), bytearray(data)
                if got != block_bytes:
                    raise CalibrationError(f"{self.label}: file is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((rows, *row_shape))

    def whole(self) -> np.ndarray:
        """The whole array (used for inputs that are the same in every sample)."""
        with self.opener() as f:
            self._header(f)
            if self.dtype.hasobject:
                raise CalibrationError(f"{self.label}: object arrays are not supported")
            count = math.prod(self.shape)
            data = f.read(count * self.dtype.itemsize)
            if len(data) != count * self.dtype.itemsize:
                raise CalibrationError(f"{self.label}: file is truncated")
            arr = np.frombuffer(bytearray(data), dtype=self.dtype, count=count)
            return arr.reshape(self.shape, order="F" if self.fortran else "C")


@dataclass
class _Plan:
    """How one input's array maps to samples."""

    member: _ArrayMember
    mode: str  # "stack" | "batch" | "single"
    rows: int
    count: int
    expand: bool = False  # "single" with the batch axis missing


def _plan_array(member: _ArrayMember, spec: InputSpec, batch_size: int) -> _Plan:
    shape = member.shape
    label = f"{member.label} (shape {list(shape)})"
    if spec.shape is None:
        return _Plan(member, "single", 0, 1)
    rank = len(spec.shape)
    if len(shape) == rank + 1:
        return _Plan(member, "stack", 1, shape[0])
    if len(shape) == rank and rank >= 1:
        rows = spec.batch or batch_size
        if shape[0] < rows:
            if spec.batch is not None:
                raise CalibrationError(
                    f"input {spec.name!r} has a fixed batch of {rows}; {label} has only {shape[0]} rows"
                )
            rows = shape[0]
        if rows == 0:
            raise CalibrationError(f"{label} for input {spec.name!r} is empty")
        if shape[0] % rows:
            logger.warning(
                "%s: %d rows do not split into batches of %d; the last %d rows are not used",
                label,
                shape[0],
                rows,
                shape[0] % rows,
            )
        return _Plan(member, "batch", rows, shape[0] // rows)
    if len(shape) == rank == 0:
        return _Plan(member, "single", 0, 1)
    if len(shape) == rank - 1 and all(
        not isinstance(want, int) or want == got for want, got in zip(spec.shape[1:], shape, strict=True)
    ):
        return _Plan(member, "single", 0, 1, expand=True)
    raise CalibrationError(
        f"input {spec.name!r} expects {spec.describe()}; {label} does not fit it (give rank {rank} "
        f"with the batch on axis 0, or rank {rank + 1} as a stack of samples)"
    )


class _ArrayReader(_Reader):
    """Samples cut from one array per input (.npz members or one .npy file)."""

    def __init__(
        self, members: dict[str, _ArrayMember], specs: Mapping[str, InputSpec], batch_size: int, label: str
    ) -> None:
        self.label = label
        self.plans = {name: _plan_array(m, specs[name], batch_size) for name, m in members.items()}
        counts = {name: p.count for name, p in self.plans.items() if p.count != 1}
        if len(set(counts.values())) > 1:
            (a, na), (b, nb) = sorted(counts.items(), key=lambda kv: kv[1])[:: len(counts) - 1]
            raise CalibrationError(f"{label}: input {a!r} has {na} samples but input {b!r} has {nb}")
        self.length = next(iter(counts.values())) if counts else 1
        if self.length == 0:
            raise CalibrationError(f"{label} holds no samples")

    def iter_from(self, start: int) -> Iterator[Sample]:
        streams: dict[str, Iterator[np.ndarray]] = {}
        fixed: dict[str, np.ndarray] = {}
        for name, plan in self.plans.items():
            if plan.mode == "single":
                whole = plan.member.whole()
                fixed[name] = whole[None] if plan.expand else whole
            elif plan.count == 1:
                block = next(plan.member.blocks(plan.rows, 0))
                fixed[name] = block[0] if plan.mode == "stack" else block
            else:
                streams[name] = plan.member.blocks(plan.rows, start)
        for _ in range(start, self.length or 0):
            sample = dict(fixed)
            for name, blocks in streams.items():
                block = next(blocks)
                sample[name] = block[0] if self.plans[name].mode == "stack" else block
            yield sample


def _npz_reader(path: Path, specs: Mapping[str, InputSpec], config: CalibrationConfig) -> _Reader:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{path}: not a readable .npz archive ({exc})") from exc
    keys = {n[: -len(".npy")]: n for n in names}
    unknown = [k for k in keys if k not in specs]
    if unknown:
        raise CalibrationError(
            f"{path}: array {unknown[0]!r} is not a model input; model inputs: "
            + ", ".join(s.name for s in _required(specs))
        )
    missing = [s.name for s in _required(specs) if s.name not in keys]
    if missing:
        raise CalibrationError(
            f"{path}: no array for model input {missing[0]!r} ({specs[missing[0]].describe()})"
        )

    def opener(member: str) -> Callable[[], IO[bytes]]:
        @contextlib.contextmanager
        def open_member() -> Iterator[IO[bytes]]:
            with zipfile.ZipFile(path) as zf, zf.open(member) as f:
                yield f

        return open_member  # type: ignore[return-value]

    members = {k: _ArrayMember(opener(m), f"{path.name}[{k}]") for k, m in keys.items()}
    return _ArrayReader(members, specs, config.batch_size, str(path))


def _single_input(specs: Mapping[str, InputSpec], config: CalibrationConfig, what: str) -> InputSpec:
    if config.input_name is not None:
        if config.input_name not in specs:
            raise CalibrationError(
                f"calibration.input_name {config.input_name!r} is not a model input; model inputs: "
                + ", ".join(s.name for s in _required(specs))
            )
        return specs[config.input_name]
    required = _required(specs)
    if len(required) != 1:
        raise CalibrationError(
            f"{what} feed one input but the model has {len(required)} ("
            + ", ".join(s.name for s in required)
            + "); set calibration.input_name, or use an .npz with one array per input"
        )
    return required[0]


def _npy_reader(path: Path, specs: Mapping[str, InputSpec], config: CalibrationConfig) -> _Reader:
    spec = _single_input(specs, config, ".npy files")
    member = _ArrayMember(lambda: open(path, "rb"), path.name)
    return _ArrayReader({spec.name: member}, specs, config.batch_size, str(path))


_PB_RE = re.compile(r"input_(\d+)\.pb$")


class _TestDataReader(_Reader):
    """ONNX ``test_data_set_*/input_N.pb`` folders: one sample per set."""

    def __init__(self, folder: Path, specs: Mapping[str, InputSpec]) -> None:
        self.label = str(folder)
        if any(_PB_RE.match(p.name) for p in folder.iterdir()):
            self.sets = [folder]
        else:
            self.sets = sorted(p for p in folder.glob("test_data_set_*") if p.is_dir())
        if not self.sets:
            raise CalibrationError(f"{folder}: no test_data_set_* folders with input_N.pb files")
        self.specs = specs
        self.length = len(self.sets)

    def _read(self, folder: Path) -> Sample:
        import onnx
        from onnx import numpy_helper

        files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PB_RE.match(p.name)))
        if not files:
            raise CalibrationError(f"{folder}: no input_N.pb files")
        required = _required(self.specs)
        sample: Sample = {}
        for index, path in files:
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(path.read_bytes())
                arr = numpy_helper.to_array(tensor)
            except Exception as exc:
                raise CalibrationError(f"{path}: not a serialized TensorProto ({exc})") from exc
            if tensor.name and tensor.name in self.specs:
                name = tensor.name
            elif index < len(required):
                name = required[index].name
            else:
                raise CalibrationError(f"{path}: the model has only {len(required)} inputs")
            sample[name] = arr
        return sample

    def iter_from(self, start: int) -> Iterator[Sample]:
        for folder in self.sets[start:]:
            yield self._read(folder)


def _image_spec(spec: InputSpec, config: CalibrationConfig) -> ImageSpec:
    shape = spec.shape
    if shape is None or len(shape) not in (3, 4):
        raise CalibrationError(
            f"image data needs an input of rank 4 (or 3); input {spec.name!r} is {spec.describe()}"
        )
    dims = shape[1:] if len(shape) == 4 else shape
    c_axis, hw = (0, (1, 2)) if config.layout == "NCHW" else (2, (0, 1))
    channels = dims[c_axis]
    other = dims[2] if config.layout == "NCHW" else dims[0]
    if isinstance(channels, int) and channels not in (1, 3):
        hint = "NHWC" if config.layout == "NCHW" else "NCHW"
        if isinstance(other, int) and other in (1, 3):
            raise CalibrationError(
                f"input {spec.name!r} is {spec.describe()}: with layout {config.layout} it would have "
                f'{channels} channels; set calibration.layout = "{hint}"'
            )
        raise CalibrationError(f"input {spec.name!r} is {spec.describe()}: images need 1 or 3 channels")
    height, width = dims[hw[0]], dims[hw[1]]
    size = shorter = crop = None
    if config.resize is not None:
        if len(config.resize) == 2:
            size = (config.resize[0], config.resize[1])
        else:
            shorter = config.resize[0]
    if config.center_crop is not None:
        crop = (config.center_crop[0], config.center_crop[-1])
    if size is None and shorter is None and crop is None:
        if isinstance(height, int) and isinstance(width, int):
            size = (height, width)
            logger.info(
                "images are resized to the model's %dx%d (set calibration.resize/center_crop)", height, width
            )
        else:
            raise CalibrationError(
                f"input {spec.name!r} has dynamic height/width; set calibration.resize (and center_crop)"
            )
    if config.dtype != "auto":
        dtype = np.dtype(config.dtype)
    elif spec.dtype is not None:
        dtype = spec.dtype
    else:
        dtype = np.dtype(np.float32)
    return ImageSpec(
        size=size,
        shorter_side=shorter,
        center_crop=crop,
        layout=config.layout,
        channel_order=config.channel_order,
        channels=channels if isinstance(channels, int) else 3,
        scale=config.scale,
        mean=config.mean,
        std=config.std,
        dtype=dtype,
    )


class _ImageReader(_Reader):
    """An image folder; ``rows`` images (the fixed batch, else ``batch_size``) per sample."""

    def __init__(self, folder: Path, specs: Mapping[str, InputSpec], config: CalibrationConfig) -> None:
        self.label = str(folder)
        self.spec = _single_input(specs, config, "image folders")
        self.image_spec = _image_spec(self.spec, config)
        self.files = list_images(folder)
        if not self.files:
            raise CalibrationError(f"{folder}: no image files ({', '.join(('.jpg', '.png', '...'))})")
        self.unbatched = self.spec.shape is not None and len(self.spec.shape) == 3
        self.rows = 1 if self.unbatched else (self.spec.batch or config.batch_size)
        self.length = len(self.files) // self.rows
        if self.length == 0:
            raise CalibrationError(f"{folder}: {len(self.files)} images cannot fill one batch of {self.rows}")

    def iter_from(self, start: int) -> Iterator[Sample]:
        for k in range(start, self.length):
            batch = [load_image(p, self.image_spec) for p in self.files[k * self.rows : (k + 1) * self.rows]]
            yield {self.spec.name: batch[0] if self.unbatched else np.stack(batch)}


class _FunctionReader(_Reader):
    """``file.py:fn``: ``fn()`` returns an iterable of samples (an array is taken for the only input)."""

    def __init__(self, ref: str, specs: Mapping[str, InputSpec]) -> None:
        self.label = ref
        file, sep, fn_name = ref.rpartition(":")
        if not sep or not file or not fn_name:
            raise CalibrationError(f"calibration function must be 'file.py:function', got {ref!r}")
        path = Path(file)
        if not path.is_file():
            raise CalibrationError(f"calibration function file {path} does not exist")
        module_name = f"_onnxcomp_calibration_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise CalibrationError(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise CalibrationError(f"{path}: importing it failed ({type(exc).__name__}: {exc})") from exc
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise CalibrationError(f"{path} has no function {fn_name!r}")
        self.fn = fn
        self.specs = specs
        required = _required(specs)
        self.only = required[0].name if len(required) == 1 else None

    def iter_from(self, start: int) -> Iterator[Sample]:
        try:
            result = self.fn()
        except Exception as exc:
            raise CalibrationError(f"{self.label} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, (Mapping, np.ndarray)) or not isinstance(result, Iterable):
            raise CalibrationError(
                f"{self.label} must return an iterable of samples ({{input: array}}), got {type(result).__name__}"
            )
        for item in itertools.islice(result, start, None):
            if isinstance(item, np.ndarray) and self.only is not None:
                item = {self.only: item}
            yield item


class _SyntheticReader(_Reader):
    """Random samples from the declared shapes; sample ``k`` is drawn from ``seed + k``."""

    def __init__(self, specs: Mapping[str, InputSpec], config: CalibrationConfig, count: int) -> None:
        self.label = "synthetic data"
        overrides = config.shape_overrides
        unknown = [n for n in overrides if n not in specs]
        if unknown:
            raise CalibrationError(f"calibration.shapes names {unknown[0]!r}, which is not a model input")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for spec in _required(specs):
            dims = overrides.get(spec.name, spec.shape)
            if dims is None:
                raise CalibrationError(
                    f"input {spec.name!r} has no declared shape; give calibration.shapes = {{ {spec.name} = [...] }}"
                )
            self.shapes[spec.name] = tuple(d if isinstance(d, int) else 1 for d in dims)
            self.dtypes[spec.name] = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
        self.seed = config.seed
        self.length = count

    def iter_from(self, start: int) -> Iterator[Sample]:
        for k in range(start, self.length or 0):
            rng = np.random.default_rng([self.seed, k])
            sample: Sample = {}
            for name, shape in self.shapes.items():
                dtype = self.dtypes[name]
                if dtype == np.bool_:
                    arr = rng.integers(0, 2, size=shape).astype(bool)
                elif dtype.kind in "iu":
                    # small non-negative ints: valid as indices, masks and small counts
                    arr = (
                        np.ones(shape) if "mask" in name.lower() else rng.integers(0, 10, size=shape)
                    ).astype(dtype)
                elif dtype.kind == "f":
                    arr = rng.standard_normal(size=shape).astype(dtype)
                else:
                    raise CalibrationError(f"synthetic data cannot make input {name!r} of type {dtype.name}")
                sample[name] = arr
            yield sample


# ---------------------------------------------------------------------------------------------- sources


class SampleSource:
    """Re-iterable samples ``[start, start + count)`` of a reader, each validated against the model."""

    def __init__(
        self,
        reader: _Reader,
        specs: Mapping[str, InputSpec],
        *,
        start: int = 0,
        count: int | None = None,
    ) -> None:
        self._reader = reader
        self.specs = dict(specs)
        self.start = start
        self.count = count

    @property
    def length(self) -> int | None:
        """Number of samples, or ``None`` when the source cannot tell without reading it all."""
        total = self._reader.length
        if total is None:
            return None
        n = max(0, total - self.start)
        return n if self.count is None else min(n, self.count)

    @property
    def label(self) -> str:
        return self._reader.label

    def __iter__(self) -> Iterator[Sample]:
        if self.count == 0:
            return
        samples = self._reader.iter_from(self.start)
        if self.count is not None:
            samples = itertools.islice(samples, self.count)
        for k, sample in enumerate(samples):
            yield validate_sample(
                sample, self.specs, where=f"sample {self.start + k} of {self._reader.label}"
            )

    def _view(self, start: int, count: int | None) -> SampleSource:
        cls = SizedSampleSource if self._reader.length is not None else SampleSource
        return cls(self._reader, self.specs, start=start, count=count)

    def split(self, holdout: int) -> tuple[SampleSource, SampleSource]:
        """``(calibration, held_out)``: the first ``holdout`` samples are held out for verification; the
        calibration part keeps this source's sample limit."""
        if holdout < 0:
            raise CalibrationError(f"holdout must be >= 0, got {holdout}")
        n = self.length
        if n is not None and holdout and n <= holdout:
            if n < 2:
                raise CalibrationError(
                    f"{self.label} has {n} sample; keeping calibration and verification samples apart needs "
                    "at least 2 (or set calibration.holdout = 0)"
                )
            logger.warning(
                "%s has only %d samples; holding out %d of them for verification instead of %d",
                self.label,
                n,
                n // 2,
                holdout,
            )
            holdout = n // 2
        held = self._view(self.start, holdout)
        rest_count = None if self.count is None else self.count
        rest = self._view(self.start + holdout, rest_count)
        return rest, held

    def skip(self, n: int) -> SampleSource:
        """The same source without its first ``n`` samples."""
        if n < 0:
            raise CalibrationError(f"cannot skip {n} samples")
        return self._view(self.start + n, None if self.count is None else max(0, self.count - n))

    def head(self, n: int | None) -> SampleSource:
        """At most the first ``n`` samples (all when ``None``)."""
        if n is None:
            return self
        return self._view(self.start, n if self.count is None else min(self.count, n))

    @property
    def files(self) -> list[Path] | None:
        """For image folders: every image file in reading order (row ``i`` of the data is file ``i``)."""
        files = getattr(self._reader, "files", None)
        return list(files) if files is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, start={self.start}, samples={self.length})"


class SizedSampleSource(SampleSource):
    """A source whose number of samples is known (``len()`` works)."""

    def __len__(self) -> int:
        n = self.length
        assert n is not None
        return n


def detect_kind(data: str) -> str:
    """``npz``, ``npy``, ``test-data`` or ``images`` from what ``data`` points at."""
    if re.search(r"\.py:\w+$", data) or data.endswith(".py"):
        raise CalibrationError(
            f'calibration data {data!r} is Python code; set kind = "function" to run it (it is never run '
            "unless asked for)"
        )
    path = Path(data)
    if not path.exists():
        raise CalibrationError(f"calibration data {path} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".npy"):
            return suffix[1:]
        raise CalibrationError(
            f"calibration data {path}: unsupported file type {suffix or '(none)'}; give an .npz/.npy file, "
            "an image folder or a folder of test_data_set_*"
        )
    entries = list(path.iterdir())
    if not entries:
        raise CalibrationError(f"calibration data folder {path} is empty")
    if any(p.is_dir() and p.name.startswith("test_data_set_") for p in entries) or any(
        _PB_RE.match(p.name) for p in entries
    ):
        return "test-data"
    if list_images(path):
        return "images"
    raise CalibrationError(
        f"calibration data folder {path} holds no images and no test_data_set_*/input_N.pb folders"
    )


def open_source(config: CalibrationConfig, *, model: ir.Model) -> SampleSource:
    """The samples ``config`` describes, validated against ``model``'s inputs (the first sample is read
    now, so a mismatch fails before any work is done). ``max_samples`` limits the calibration samples."""
    specs = model_input_specs(model)
    kind = config.kind
    if kind == "auto":
        if config.data is None:
            raise CalibrationError(
                'no calibration data; set [calibration] data = PATH (or kind = "synthetic")'
            )
        kind = detect_kind(config.data)
    reader: _Reader
    if kind == "function":
        reader = _FunctionReader(config.function or str(config.data), specs)
    elif kind == "synthetic":
        reader = _SyntheticReader(specs, config, config.max_samples or 16)
        logger.warning(
            "calibrating on synthetic random inputs: quantization ranges (and so accuracy) will be poor; "
            "give real samples with --calib"
        )
    else:
        if config.data is None:
            raise CalibrationError(f'kind = "{kind}" needs data = PATH')
        path = Path(config.data)
        if not path.exists():
            raise CalibrationError(f"calibration data {path} does not exist")
        if kind in ("npz", "npy") and not path.is_file():
            raise CalibrationError(f"calibration data {path} is not a .{kind} file")
        if kind in ("test-data", "images") and not path.is_dir():
            raise CalibrationError(f"calibration data {path} is not a folder")
        if kind in ("test-data", "images") and not any(path.iterdir()):
            raise CalibrationError(f"calibration data folder {path} is empty")
        if kind == "npz":
            reader = _npz_reader(path, specs, config)
        elif kind == "npy":
            reader = _npy_reader(path, specs, config)
        elif kind == "test-data":
            reader = _TestDataReader(path, specs)
        else:
            reader = _ImageReader(path, specs, config)
    cls = SizedSampleSource if reader.length is not None else SampleSource
    source = cls(reader, specs, count=config.max_samples)
    first = next(iter(source), None)
    if first is None:
        raise CalibrationError(f"{reader.label} yielded no samples")
    del first
    return source
