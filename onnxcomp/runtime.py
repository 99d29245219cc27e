"""Load packed onnxcomp artifacts with nothing but ONNX Runtime, numpy and the standard library.

An artifact is a zip file holding ``manifest.json``, the model protobuf and, when the model has
external data, that data file (tensors whose layout the manifest marks as sparse or nibble-packed are
cut out of it and stored in a side member, then decoded here). :func:`load_session` decompresses
everything in memory, checks the sha256 of every member, and hands the bytes to ONNX Runtime without
writing anything to disk: large data files as OrtValues viewing the verified buffer (the initializers'
offsets come from a minimal protobuf walk of the model; ``add_external_initializers``, no copy), small
ones with ``add_external_initializers_from_files_in_memory``. The members holding only dense tensor
bytes are hashed in a thread while ONNX Runtime builds the session (it releases the GIL); the session
is returned only when they pass. :func:`unpack` writes the plain ``.onnx`` (+ data file) back,
atomically, after checking everything including the rebuilt data file.

Solid artifacts (the manifest's ``solid`` table) hold the files back to back in one or more members:
they are read into one buffer (stored members straight from the file, deflated ones inflated by
threads: zlib and sha256 release the GIL) and cut into files without copies; sparse/shuffled
regions are decoded in place right behind the dense data bytes.

Every member is checked before a byte is decompressed: names must be relative and stay inside the
output folder, symlinks, folders, duplicate names and unknown members are refused, each member's size
must agree with the manifest, and the total decompressed size must stay under a limit (zip bombs).

This module must not import onnx or onnx-ir (``onnxcomp.errors`` and ``onnxcomp/__init__`` are
stdlib-only), so deployment needs only ``pip install onnxruntime``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError

__all__ = [
    "DEFAULT_MAX_UNPACKED_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SOLID_NAME",
    "ArtifactError",
    "UnpackedArtifact",
    "decode_region",
    "is_artifact",
    "load_session",
    "read_artifact",
    "read_manifest",
    "unpack",
]

FORMAT_NAME = "onnxcomp-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: The zip member that holds every file back to back when the artifact is packed ``solid``.
SOLID_NAME = "payload"
#: Marks a file cut out of a verified solid member (its bytes are covered by that member's sha256).
_IN_VERIFIED_MEMBER = "in-verified-member"
#: Refuse artifacts whose members (plus the rebuilt data file) decompress to more than this.
DEFAULT_MAX_UNPACKED_BYTES = 16 << 30
_MAX_MANIFEST_BYTES = 64 << 20
_LAYOUTS = ("csr", "csc", "bitmask", "nibble", "bytes4", "shuffle")
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INDEX_DTYPES = ("<u1", "<u2", "<u4", "<u8", "<i4", "<i8")


class ArtifactError(OnnxcompError):
    """A packed artifact is malformed, unsafe, corrupt or needs a codec that is not installed."""


@dataclass
class UnpackedArtifact:
    """An artifact decompressed in memory: its manifest, the model protobuf and its data files."""

    manifest: dict[str, Any]
    model_name: str
    model_bytes: bytes
    files: dict[str, bytes | bytearray | memoryview]


def _max_bytes(limit: int | None) -> int:
    if limit is not None:
        return int(limit)
    env = os.environ.get("ONNXCOMP_MAX_UNPACKED_BYTES")
    return int(env) if env else DEFAULT_MAX_UNPACKED_BYTES


def check_member_name(name: str, where: str) -> None:
    """Refuse names that are absolute, contain ``..``/``.``/empty parts, backslashes or NUL bytes."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(
            f"{where}: a member has an empty or non-text name; the artifact is not trustworthy"
        )
    if "\x00" in name or "\\" in name:
        raise ArtifactError(f"{where}: member name {name!r} contains a backslash or NUL byte; refusing it")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(f"{where}: member name {name!r} is an absolute path; refusing it")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(
            f"{where}: member name {name!r} would escape or confuse the output folder ('..', '.' or empty "
            "path parts); refusing it"
        )


def is_artifact(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a zip file with an onnxcomp manifest."""
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST_NAME in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file; check the path")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{path}: not a zip artifact ({exc}); re-create it with `onnxcomp pack`") from exc


def _check_infos(zf: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    dupes = [n for n, c in Counter(i.filename for i in infos).items() if c > 1]
    if dupes:
        raise ArtifactError(f"{where}: member {dupes[0]!r} appears more than once; refusing the artifact")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        check_member_name(info.filename, where)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArtifactError(f"{where}: member {info.filename!r} is a symbolic link; refusing it")
        if info.is_dir():
            raise ArtifactError(f"{where}: member {info.filename!r} is a folder; artifacts hold only files")
        if info.flag_bits & 0x1:
            raise ArtifactError(f"{where}: member {info.filename!r} is encrypted; refusing it")
        out[info.filename] = info
    return out


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{where}: {MANIFEST_NAME} is not valid JSON ({exc}); the artifact is corrupt"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} is not an onnxcomp manifest; re-create the artifact")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{where}: the manifest has no integer format_version; the artifact is corrupt")
    if version != FORMAT_VERSION:
        newer = " (made by a newer onnxcomp; upgrade onnxcomp)" if version > FORMAT_VERSION else ""
        raise ArtifactError(
            f"{where}: unknown artifact format version {version}; this onnxcomp reads version "
            f"{FORMAT_VERSION}{newer}"
        )
    members = manifest.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ArtifactError(f"{where}: the manifest has no member list; the artifact is corrupt")
    for m in members:
        check_member_name(m.get("name"), where)
        size = m.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{where}: member {m.get('name')!r} has no valid size in the manifest")
        if not isinstance(m.get("sha256"), str) or len(m["sha256"]) != 64:
            raise ArtifactError(f"{where}: member {m.get('name')!r} has no sha256 in the manifest")
    names = [m["name"] for m in members]
    if manifest.get("solid") is not None:
        names += _check_solid(manifest["solid"], {m["name"]: m for m in members}, where)
    if len(names) != len(set(names)):
        raise ArtifactError(f"{where}: the manifest lists a file twice; refusing the artifact")
    return manifest


def _check_solid(solid: Any, members: dict[str, dict[str, Any]], where: str) -> list[str]:
    """``solid``: zip members (in order) whose concatenation is the listed files (``parts``) back to
    back; the part sizes must add up to the members' sizes. Returns the part names."""
    if not isinstance(solid, dict):
        raise ArtifactError(f"{where}: the manifest's solid table is malformed; the artifact is corrupt")
    chunks, parts = solid.get("members"), solid.get("parts")
    if (
        not isinstance(chunks, list)
        or not chunks
        or not isinstance(parts, list)
        or not parts
        or not all(isinstance(p, dict) for p in parts)
    ):
        raise ArtifactError(f"{where}: the manifest's solid table is malformed; the artifact is corrupt")
    if any(not isinstance(c, str) or c not in members for c in chunks) or len(set(chunks)) != len(chunks):
        raise ArtifactError(f"{where}: the solid table names unknown or repeated members; refusing it")
    total = 0
    for part in parts:
        check_member_name(part.get("name"), where)
        size = part.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{where}: part {part.get('name')!r} has no valid size in the manifest")
        total += size
    stored = sum(members[c]["size"] for c in chunks)
    if total != stored:
        raise ArtifactError(
            f"{where}: the solid parts add up to {total} bytes, their members hold {stored}; refusing it"
        )
    return [p["name"] for p in parts]


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of an artifact (nothing else is decompressed)."""
    p = Path(path)
    with _open_zip(p) as zf:
        return _manifest_of(zf, _check_infos(zf, str(p)), p)


def _manifest_of(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], p: Path) -> dict[str, Any]:
    """Read and validate the manifest of an open artifact whose members ``infos`` were checked."""
    if MANIFEST_NAME not in infos:
        raise ArtifactError(f"{p}: no {MANIFEST_NAME}; not an onnxcomp artifact")
    if infos[MANIFEST_NAME].file_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{p}: {MANIFEST_NAME} is implausibly large; refusing the artifact")
    try:
        raw = zf.read(MANIFEST_NAME)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        raise ArtifactError(f"{p}: cannot read {MANIFEST_NAME} ({exc}); the artifact is corrupt") from exc
    return _parse_manifest(raw, str(p))


def _zstd_decompress(payload: bytes, size: int, where: str) -> bytes:
    """Decompress one zstd frame, never producing more than ``size + 1`` bytes."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14

        try:
            return zstd.ZstdDecompressor().decompress(payload, max_length=size + 1)
        except zstd.ZstdError as exc:
            raise ArtifactError(f"{where}: corrupt zstd data ({exc})") from exc
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ArtifactError(
            f"{where}: the artifact uses zstd; install it with `pip install zstandard` (or use Python 3.14+)"
        ) from exc
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
            return reader.read(size + 1)
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"{where}: corrupt zstd data ({exc})") from exc


def _seek_to_data(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    """The archive's file object, positioned at the first byte of ``info``'s (compressed) data."""
    fp = zf.fp
    assert fp is not None
    fp.seek(info.header_offset)
    header = fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    fp.seek(info.header_offset + 30 + name_len + extra_len)
    return fp


def _fetch(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes | None:
    """The compressed bytes of a Stored/Deflate member (read straight from the file); None for other
    methods, which go through ``zipfile``."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or zf.fp is None:
        return None
    fp = _seek_to_data(zf, info)
    comp = fp.read(info.compress_size)
    if len(comp) != info.compress_size:
        raise zipfile.BadZipFile(f"{info.filename!r} is truncated")
    return comp


def _inflate(info: zipfile.ZipInfo, comp: bytes) -> bytes:
    """Decompress in one bounded zlib call (no chunked CRC pass: the sha256 check that follows is
    stronger). zlib releases the GIL, so members decode in parallel threads."""
    if info.compress_type == zipfile.ZIP_STORED:
        return comp
    inflater = zlib.decompressobj(-15)
    try:
        return inflater.decompress(comp, info.file_size + 1)
    except zlib.error as exc:
        raise zipfile.BadZipFile(f"{info.filename!r}: {exc}") from exc


def _fetch_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes | Callable[[], bytes]:
    """Read one member: its compressed bytes (for :func:`_decode_member`), or, for methods other than
    Stored/Deflate, a callable returning the bytes ``zipfile`` decompressed here."""
    try:
        comp = _fetch(zf, info)
        if comp is not None:
            return comp
        with zf.open(info) as fh:
            data = fh.read(info.file_size + 1)
        return lambda: data
    except NotImplementedError as exc:
        raise ArtifactError(
            f"{where}: member {info.filename!r} uses a compression method this Python cannot read ({exc})"
        ) from exc
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
        raise ArtifactError(
            f"{where}: member {info.filename!r} is corrupt ({exc}); re-create the artifact"
        ) from exc


def _decode_member(
    info: zipfile.ZipInfo,
    fetched: bytes | Callable[[], bytes],
    entry: dict[str, Any],
    where: str,
    *,
    check_sha: bool = True,
) -> bytes:
    """Decompress one fetched member and check its size and sha256 against the manifest (the sha256
    is left to the caller when ``check_sha`` is false)."""
    name = info.filename
    encoding = entry.get("encoding", "zip")
    try:
        data = fetched() if callable(fetched) else _inflate(info, fetched)
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
        raise ArtifactError(f"{where}: member {name!r} is corrupt ({exc}); re-create the artifact") from exc
    if len(data) != info.file_size:
        raise ArtifactError(f"{where}: member {name!r} decompresses to a different size than its header says")
    if encoding == "zstd":
        data = _zstd_decompress(data, entry["size"], f"{where}: member {name!r}")
    elif encoding != "zip":
        raise ArtifactError(f"{where}: member {name!r} has unknown encoding {encoding!r}; upgrade onnxcomp")
    if len(data) != entry["size"]:
        raise ArtifactError(
            f"{where}: member {name!r} is {len(data)} bytes, the manifest says {entry['size']}; refusing it"
        )
    if check_sha:
        _check_sha(data, entry["sha256"], name, where)
    return data


def _check_sha(data: bytes | memoryview, digest: str, name: str, where: str) -> None:
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactError(f"{where}: member {name!r} fails its sha256 check; the artifact is corrupt")


#: Members at least this large (all together) are decoded by a thread pool.
_PARALLEL_BYTES = 1 << 20


def _run_all(tasks: list[Callable[[], Any]], parallel: bool) -> list[Any]:
    """Call every task, in ``os.cpu_count()`` threads when ``parallel`` (zlib and sha256 release the
    GIL); returns the results in order and re-raises the first error. Plain threads: importing
    ``concurrent.futures`` alone costs ~8 ms of a cold start."""
    workers = min(len(tasks), os.cpu_count() or 1)
    if not parallel or workers < 2:
        return [task() for task in tasks]
    import threading

    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)
    lock = threading.Lock()
    todo = iter(range(len(tasks)))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = tasks[i]()
            except BaseException as exc:  # re-raised in the caller's thread
                errors[i] = exc

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers - 1)]
    for t in threads:
        t.start()
    worker()
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return results


def _decode_all(
    fetched: dict[str, tuple[zipfile.ZipInfo, bytes | Callable[[], bytes], dict[str, Any]]], where: str
) -> dict[str, bytes]:
    """Decode every member, in parallel threads when there are several large ones."""
    total = sum(e["size"] for _, _, e in fetched.values())
    names = list(fetched)
    tasks = [lambda n=n: _decode_member(fetched[n][0], fetched[n][1], fetched[n][2], where) for n in names]
    return dict(zip(names, _run_all(tasks, total >= _PARALLEL_BYTES), strict=True))


def _int(region: dict[str, Any], key: str, where: str) -> int:
    value = region.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ArtifactError(f"{where}: region field {key!r} is missing or not a non-negative integer")
    return value


def decode_region(
    region: dict[str, Any],
    payload: bytes | memoryview,
    *,
    where: str = "artifact",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one stored region back to its dense bytes (uint8 array of ``region['length']`` bytes;
    layouts that can write straight into ``out`` do so and return it).

    Layouts (words are ``itemsize``-byte little-endian values; zero means all bits zero):
    ``csr``: indptr[rows+1] | column indices[nnz] | values[nnz] of the [rows, cols] word matrix;
    ``csc``: the same for its transpose (indptr[cols+1], row indices);
    ``bitmask``: packbits(word != 0) | values[nnz];
    ``nibble``: two 4-bit codes per byte (low nibble first), sign-extended when ``signed``;
    ``bytes4``: the 4-bit codes of an INT4/UINT4 tensor one per byte, packed back two per byte;
    ``shuffle``: byte planes (all first bytes of the words, then all second bytes, ...).
    """
    layout = region.get("layout")
    length = _int(region, "length", where)
    if layout == "nibble":
        count = _int(region, "count", where)
        if count != length or len(payload) != (count + 1) // 2:
            raise ArtifactError(f"{where}: nibble region sizes disagree; the artifact is corrupt")
        packed = np.frombuffer(payload, dtype=np.uint8)
        out = np.empty(2 * packed.size, dtype=np.uint8)
        out[0::2] = packed & 0x0F
        out[1::2] = packed >> 4
        out = out[:count]
        if region.get("signed", True):
            out = np.where(out >= 8, out.astype(np.int16) - 16, out).astype(np.int8).view(np.uint8)
        return out
    if layout == "shuffle":
        itemsize = _int(region, "itemsize", where)
        if itemsize < 1 or len(payload) != length or length % itemsize:
            raise ArtifactError(f"{where}: shuffle region sizes disagree; the artifact is corrupt")
        planes = np.frombuffer(payload, dtype=np.uint8).reshape(itemsize, -1)
        if out is not None and out.size == length:
            words = out.reshape(-1, itemsize)  # decode straight into the rebuilt file
        else:
            words = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
        for i in range(itemsize):  # one contiguous read per plane
            words[:, i] = planes[i]
        return words.reshape(-1)
    if layout == "bytes4":
        count = _int(region, "count", where)
        codes = np.frombuffer(payload, dtype=np.uint8)
        if codes.size != count or length != (count + 1) // 2 or (count and codes.max() > 15):
            raise ArtifactError(f"{where}: bytes4 region sizes disagree; the artifact is corrupt")
        padded = np.zeros(2 * length, dtype=np.uint8)
        padded[:count] = codes
        return padded[0::2] | (padded[1::2] << 4)
    if layout not in ("csr", "csc", "bitmask"):
        raise ArtifactError(f"{where}: unknown region layout {layout!r}; upgrade onnxcomp")
    itemsize = _int(region, "itemsize", where)
    rows, cols, nnz = (_int(region, k, where) for k in ("rows", "cols", "nnz"))
    if itemsize not in _WORD or rows * cols * itemsize != length or nnz > rows * cols:
        raise ArtifactError(f"{where}: sparse region sizes disagree; the artifact is corrupt")
    word = np.dtype(_WORD[itemsize]).newbyteorder("<")
    dense = np.zeros(rows * cols, dtype=word)
    buf = memoryview(payload)
    try:
        if layout == "bitmask":
            mask_bytes = (rows * cols + 7) // 8
            mask = np.unpackbits(np.frombuffer(buf[:mask_bytes], dtype=np.uint8), count=rows * cols).astype(
                bool
            )
            values = np.frombuffer(buf[mask_bytes:], dtype=word)
            if int(mask.sum()) != nnz or values.size != nnz:
                raise ArtifactError(f"{where}: bitmask region counts disagree; the artifact is corrupt")
            dense[mask] = values
        else:
            ptr_dt, idx_dt = region.get("indptr_dtype"), region.get("index_dtype")
            if ptr_dt not in _INDEX_DTYPES or idx_dt not in _INDEX_DTYPES:
                raise ArtifactError(f"{where}: sparse region has unknown index types; upgrade onnxcomp")
            outer, inner = (rows, cols) if layout == "csr" else (cols, rows)
            ptr_n = (outer + 1) * np.dtype(ptr_dt).itemsize
            idx_n = nnz * np.dtype(idx_dt).itemsize
            indptr = np.frombuffer(buf[:ptr_n], dtype=ptr_dt).astype(np.int64)
            indices = np.frombuffer(buf[ptr_n : ptr_n + idx_n], dtype=idx_dt).astype(np.int64)
            values = np.frombuffer(buf[ptr_n + idx_n :], dtype=word)
            if (
                indptr.size != outer + 1
                or indices.size != nnz
                or values.size != nnz
                or indptr[0] != 0
                or indptr[-1] != nnz
                or np.any(np.diff(indptr) < 0)
                or (nnz and (indices.min() < 0 or indices.max() >= inner))
            ):
                raise ArtifactError(
                    f"{where}: sparse region indices are inconsistent; the artifact is corrupt"
                )
            major = np.repeat(np.arange(outer, dtype=np.int64), np.diff(indptr))
            flat = major * cols + indices if layout == "csr" else indices * cols + major
            dense[flat] = values
    except ValueError as exc:
        raise ArtifactError(f"{where}: sparse region is truncated ({exc}); the artifact is corrupt") from exc
    return dense.view(np.uint8)


def _rebuild_data(
    spec: dict[str, Any],
    blobs: dict[str, bytes | memoryview],
    digests: dict[str, str],
    where: str,
    *,
    verify: bool = True,
    dest: memoryview | None = None,
) -> tuple[str, bytes | bytearray | memoryview]:
    """Rebuild the external data file: dense member bytes fill the gaps between decoded regions.

    ``digests`` are the already verified sha256 of the members (a data file equal to one member is not
    hashed twice). ``dest``: where to build the file (``size`` bytes), e.g. memory that already starts
    with the dense bytes (then the gaps in front of the regions are not copied)."""
    file_name = spec.get("file")
    check_member_name(file_name, where)
    size = _int(spec, "size", where)
    dense_member = spec.get("dense_member")
    dense = blobs.get(dense_member, b"") if dense_member else b""
    regions = spec.get("regions") or []
    if not isinstance(regions, list):
        raise ArtifactError(f"{where}: external_data.regions must be a list; the artifact is corrupt")
    if not regions:
        if len(dense) != size:
            raise ArtifactError(f"{where}: the data member is {len(dense)} bytes, the manifest says {size}")
        out: bytes | bytearray | memoryview = dense
    else:
        buf: bytearray | memoryview = bytearray(size) if dest is None or len(dest) != size else dest
        view = np.frombuffer(buf, dtype=np.uint8)
        dense_arr = np.frombuffer(dense, dtype=np.uint8)
        in_place = (
            dense_arr.size > 0
            and view.__array_interface__["data"][0] == dense_arr.__array_interface__["data"][0]
        )
        pos = 0  # position in the data file
        dpos = 0  # position in the dense member
        for region in sorted(regions, key=lambda r: r.get("offset", -1)):
            offset = _int(region, "offset", where)
            length = _int(region, "length", where)
            if offset < pos or offset + length > size:
                raise ArtifactError(
                    f"{where}: data regions overlap or run past the file; the artifact is corrupt"
                )
            gap = offset - pos
            if gap and not (in_place and pos == dpos):  # numpy handles overlapping copies
                view[pos:offset] = dense_arr[dpos : dpos + gap]
            dpos += gap
            member = blobs.get(region.get("member", ""))
            start, nbytes = _int(region, "start", where), _int(region, "nbytes", where)
            if member is None or start + nbytes > len(member):
                raise ArtifactError(
                    f"{where}: a data region points outside its member; the artifact is corrupt"
                )
            target = view[offset : offset + length]
            decoded = decode_region(
                region, memoryview(member)[start : start + nbytes], where=where, out=target
            )
            if decoded.size != length:
                raise ArtifactError(f"{where}: a decoded region has the wrong size; the artifact is corrupt")
            if not np.shares_memory(decoded, target):
                target[:] = decoded
            pos = offset + length
        tail = size - pos
        if dpos + tail != len(dense):
            raise ArtifactError(f"{where}: the dense data member has the wrong size; the artifact is corrupt")
        if tail and not (in_place and pos == dpos):
            view[pos:] = dense_arr[dpos : dpos + tail]
        out = buf
    digest = spec.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ArtifactError(f"{where}: external_data has no sha256; the artifact is corrupt")
    dense_digest = digests.get(dense_member or "")
    if (regions and verify) or (not regions and dense_digest not in (digest, _IN_VERIFIED_MEMBER)):
        verified = hashlib.sha256(out).hexdigest() == digest
    else:
        verified = True  # the file is the dense member, whose sha256 was just checked
    if not verified:
        raise ArtifactError(f"{where}: the rebuilt data file {file_name!r} fails its sha256 check")
    return file_name, out


def _room_for_regions(solid: dict[str, Any], ext: Any) -> int:
    """Bytes to allocate behind the solid files so the data file can be rebuilt in place: when the dense
    data is the last part and is shorter than the data file, the decoded regions go right behind it."""
    if not isinstance(ext, dict) or not ext.get("regions"):
        return 0
    last = solid["parts"][-1]
    size = ext.get("size")
    if last.get("name") != ext.get("dense_member") or not isinstance(size, int) or size < last["size"]:
        return 0
    offsets = [r.get("offset") for r in ext["regions"] if isinstance(r, dict)]
    if not all(isinstance(o, int) and o >= last["size"] for o in offsets):
        return 0  # regions between dense bytes: rebuilt in a separate buffer (no overlapping moves)
    return size - last["size"]


def _read_solid(
    zf: zipfile.ZipFile,
    infos: dict[str, zipfile.ZipInfo],
    entries: dict[str, dict[str, Any]],
    chunks: list[str],
    extra: int,
    where: str,
    deferred: list[tuple[str, memoryview, str]] | None = None,
    defer_range: tuple[int, int] = (0, 0),
) -> memoryview:
    """The solid members back to back in one buffer (plus ``extra`` zero bytes behind them): Stored
    members are read straight into place, the others inflated (in parallel threads) and copied in;
    the size and sha256 of every member are checked. Members that lie wholly inside ``defer_range``
    (bytes of the solid stream) have their sha256 appended to ``deferred`` instead, when given."""
    total = sum(entries[c]["size"] for c in chunks)
    # np.empty: no zero-filling pass (every byte is written below or by the region decoder)
    buf = memoryview(np.empty(total + extra, dtype=np.uint8)).cast("B")
    tasks: list[Callable[[], None]] = []
    pos = 0
    for name in chunks:
        info, entry = infos[name], entries[name]
        target = buf[pos : pos + entry["size"]]
        later = deferred is not None and defer_range[0] <= pos and pos + entry["size"] <= defer_range[1]
        pos += entry["size"]
        if later:
            assert deferred is not None
            deferred.append((name, target, entry["sha256"]))
        direct = (
            info.compress_type == zipfile.ZIP_STORED
            and entry.get("encoding", "zip") == "zip"
            and info.file_size == entry["size"]
            and zf.fp is not None
        )
        if direct:
            try:
                _fetch_into(zf, info, target)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ArtifactError(
                    f"{where}: member {name!r} is corrupt ({exc}); re-create the artifact"
                ) from exc
            if not later:
                tasks.append(lambda t=target, e=entry, n=name: _check_sha(t, e["sha256"], n, where))
        else:
            fetched = _fetch_member(zf, info, where)

            def inflate(i=info, f=fetched, e=entry, t=target, check=not later) -> None:
                t[:] = _decode_member(i, f, e, where, check_sha=check)

            tasks.append(inflate)
    _run_all(tasks, total >= _PARALLEL_BYTES)
    return buf


def _hash_later(deferred: list[tuple[str, memoryview, str]], where: str) -> Callable[[], None]:
    """Start checking the sha256 of ``deferred`` members in a background thread (hashlib releases the
    GIL, so it overlaps ONNX Runtime building the session); the returned callable waits for it and
    raises :class:`ArtifactError` if a member fails its check."""
    if not deferred:
        return lambda: None
    import threading

    failed: list[BaseException] = []

    def check() -> None:
        try:
            for name, view, digest in deferred:
                _check_sha(view, digest, name, where)
        except BaseException as exc:  # re-raised by wait()
            failed.append(exc)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


def _dense_range(solid: dict[str, Any], ext: Any) -> tuple[int, int]:
    """Where the dense tensor bytes lie in the solid stream ((0, 0) when they are not a solid part)."""
    pos = 0
    for part in solid["parts"]:
        if isinstance(ext, dict) and part["name"] == ext.get("dense_member"):
            return pos, pos + part["size"]
        pos += part["size"]
    return 0, 0


def _fetch_into(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: memoryview) -> None:
    """Read a Stored member's bytes straight into ``target``."""
    fp = _seek_to_data(zf, info)
    if fp.readinto(target) != len(target):
        raise zipfile.BadZipFile(f"{info.filename!r} is truncated")


def read_artifact(
    path: str | os.PathLike[str], *, max_unpacked_bytes: int | None = None, verify_data: bool = True
) -> UnpackedArtifact:
    """Decompress and verify an artifact in memory (sizes, names, sha256 of every member).

    ``verify_data`` also checks the sha256 of the data file rebuilt from sparse/shuffled regions (it
    guards the decoders, not the artifact: every member it is built from is already checked)."""
    return _read_artifact(path, max_unpacked_bytes, verify_data, None)


def _read_artifact(
    path: str | os.PathLike[str],
    max_unpacked_bytes: int | None,
    verify_data: bool,
    deferred: list[tuple[str, memoryview, str]] | None,
) -> UnpackedArtifact:
    """:func:`read_artifact`; with ``deferred``, the sha256 of the solid members holding only dense
    tensor bytes is left to the caller (appended there), every other member is checked here."""
    p = Path(path)
    limit = _max_bytes(max_unpacked_bytes)
    where = str(p)
    with _open_zip(p) as zf:
        infos = _check_infos(zf, where)
        manifest = _manifest_of(zf, infos, p)
        entries = {m["name"]: m for m in manifest["members"]}
        if len(entries) != len(manifest["members"]):
            raise ArtifactError(f"{where}: the manifest lists a member twice; refusing the artifact")
        stored = set(infos) - {MANIFEST_NAME}
        if stored != set(entries):
            extra = sorted(stored - set(entries))
            missing = sorted(set(entries) - stored)
            what = f"unlisted member {extra[0]!r}" if extra else f"missing member {missing[0]!r}"
            raise ArtifactError(f"{where}: {what}; the zip does not match its manifest, refusing it")
        ext = manifest.get("external_data")
        total = sum(m["size"] for m in entries.values())
        if ext is not None:
            if not isinstance(ext, dict):
                raise ArtifactError(f"{where}: external_data must be a table; the artifact is corrupt")
            total += _int(ext, "size", where)
        if total > limit:
            raise ArtifactError(
                f"{where}: the artifact would decompress to {total} bytes, above the limit of {limit} "
                "(pass max_unpacked_bytes= or set ONNXCOMP_MAX_UNPACKED_BYTES to allow it)"
            )
        for name, entry in entries.items():
            info = infos[name]
            zstd = entry.get("encoding", "zip") == "zstd"
            expected = entry.get("stored_size") if zstd else entry["size"]
            if info.file_size != expected:
                raise ArtifactError(
                    f"{where}: member {name!r} is {info.file_size} bytes in the zip, the manifest says "
                    f"{expected}; refusing it"
                )
        solid = manifest.get("solid")
        chunk_names = set(solid["members"]) if solid is not None else set()
        fetched = {
            name: (infos[name], _fetch_member(zf, infos[name], where), e)
            for name, e in entries.items()
            if name not in chunk_names
        }
        dest: memoryview | None = None
        digests = {n: e["sha256"] for n, e in entries.items()}
        whole: memoryview | None = None
        if solid is not None:
            extra = _room_for_regions(solid, ext)
            whole = _read_solid(
                zf, infos, entries, solid["members"], extra, where, deferred, _dense_range(solid, ext)
            )
    blobs: dict[str, bytes | memoryview] = dict(_decode_all(fetched, where))
    if solid is not None and whole is not None:  # cut the verified solid members into their files
        pos = 0
        for part in solid["parts"]:
            blobs[part["name"]] = whole[pos : pos + part["size"]]
            digests[part["name"]] = _IN_VERIFIED_MEMBER
            last = (pos, part)
            pos += part["size"]
        start, part = last
        if ext is not None and part["name"] == ext.get("dense_member") and len(whole) > pos:
            dest = whole[start : start + _int(ext, "size", where)]
    model_name = manifest.get("model")
    if model_name not in blobs:
        raise ArtifactError(f"{where}: the manifest names no model member; the artifact is corrupt")
    files: dict[str, bytes | bytearray | memoryview] = {}
    if ext is not None:
        file_name, data = _rebuild_data(ext, blobs, digests, where, verify=verify_data, dest=dest)
        files[file_name] = data
    return UnpackedArtifact(manifest, model_name, bytes(blobs[model_name]), files)


#: External data at least this large goes to ONNX Runtime as OrtValues viewing the verified buffer
#: (``add_external_initializers``: no copy; ``add_external_initializers_from_files_in_memory`` copies
#: every tensor, ~25 ms of a 17 MB model's cold start); below it the ~2 ms protobuf walk costs more.
_ORTVALUE_BYTES = 4 << 20
#: ONNX ``TensorProto.DataType`` -> numpy dtype, for the types ONNX Runtime takes as numpy-backed OrtValues
_ONNX_NP = {
    1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
    12: "<u4", 13: "<u8",
}  # fmt: skip


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # fast path: one byte
        return buf[pos], pos + 1
    shift = value = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> Any:
    """Yield ``(field number, wire type, value)`` of a protobuf message: varints as ints,
    length-delimited fields as ``(start, end)`` offsets into ``buf``; fixed-width values skipped."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def _initializer_spans(buf: bytes, pos: int, end: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every ``initializer`` (field 5) of the GraphProto in ``buf[pos:end]``,
    skipping the other fields (nodes, value_info) by their length without decoding them."""
    spans = []
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            if key >> 3 == 5:
                spans.append((pos, pos + n))
            pos += n
        elif wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")
    return spans


def _external_initializers(model: bytes) -> list[tuple[str, int, list[int], dict[str, str]]]:
    """The main-graph initializers of a ModelProto that keep their bytes in external data:
    ``(name, data_type, dims, external_data)``. A minimal protobuf walk (ModelProto.graph = 7,
    GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, name = 8, external_data = 13,
    data_location = 14), so that this module needs no ``onnx``. Raises ValueError on malformed bytes."""
    out = []
    try:
        for field, wire, graph in _fields(model):
            if field == 7 and wire == 2:
                for tensor in _initializer_spans(model, *graph):
                    parsed = _tensor_header(model, *tensor)
                    if parsed is not None:
                        out.append(parsed)
    except IndexError as exc:
        raise ValueError("truncated message") from exc
    return out


def _tensor_header(buf: bytes, pos: int, end: int) -> tuple[str, int, list[int], dict[str, str]] | None:
    """``(name, data_type, dims, external_data)`` of the TensorProto in ``buf[pos:end]`` when its
    data is external, else None (one flat loop: this runs once per initializer of a cold start)."""
    name, dtype, dims, ext, location = "", 0, [], {}, 0
    while pos < end:
        key = buf[pos]
        key, pos = (key, pos + 1) if key < 0x80 else _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = buf[pos]
            value, pos = (value, pos + 1) if value < 0x80 else _varint(buf, pos)
            if field == 1:
                dims.append(value)
            elif field == 2:
                dtype = value
            elif field == 14:
                location = value
        elif wire == 2:
            n = buf[pos]
            n, pos = (n, pos + 1) if n < 0x80 else _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            if field == 8:
                name = buf[pos : pos + n].decode("utf-8")
            elif field == 13:
                kv = {f: buf[v[0] : v[1]].decode("utf-8") for f, w, v in _fields(buf, pos, pos + n) if w == 2}
                ext[kv.get(1, "")] = kv.get(2, "")
            elif field == 1:  # packed dims
                p = pos
                while p < pos + n:
                    d, p = _varint(buf, p)
                    dims.append(d)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")
    return (name, dtype, dims, ext) if location == 1 else None


def _initializer_values(
    model: bytes, files: dict[str, bytes | bytearray | memoryview]
) -> tuple[list[str], list[Any], bool]:
    """OrtValues viewing (no copy) the bytes of every main-graph initializer stored in ``files``, and
    whether they cover all of them (tensors of other types, odd offsets or entries that do not fit
    their file are left to ``add_external_initializers_from_files_in_memory``)."""
    try:
        tensors = _external_initializers(model)
    except (ValueError, UnicodeDecodeError):
        return [], [], False  # ONNX Runtime reports malformed protobufs itself
    arrays = {name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()}
    names: list[str] = []
    values: list[Any] = []
    complete = True
    for name, dtype, dims, ext in tensors:
        data = arrays.get(ext.get("location", ""))
        np_dtype = _ONNX_NP.get(dtype)
        if data is None or np_dtype is None or not ext.get("length", "").isdigit():
            complete = False
            continue
        offset, length = int(ext.get("offset", "0") or "0"), int(ext["length"])
        itemsize = np.dtype(np_dtype).itemsize
        count = 1
        for d in dims:
            count *= d
        if offset + length > data.size or length != count * itemsize or offset % itemsize:
            complete = False
            continue
        arr = data[offset : offset + length].view(np_dtype).reshape(dims)
        names.append(name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
    # external tensors elsewhere (subgraphs, Constant nodes) each carry a "location" entry too
    if model.count(b"\n\x08location") > len(tensors):
        complete = False
    return names, values, complete


def _session_options(sess_options: ort.SessionOptions | None, options: dict[str, Any]) -> ort.SessionOptions:
    so = sess_options or ort.SessionOptions()
    for key, value in options.items():
        if key.startswith("_") or not hasattr(so, key):
            valid = ", ".join(a for a in dir(so) if not a.startswith("_") and not callable(getattr(so, a)))
            raise ArtifactError(f"load_session: unknown session option {key!r}; valid options are: {valid}")
        setattr(so, key, value)
    return so


def load_session(
    path: str | os.PathLike[str],
    *,
    sess_options: ort.SessionOptions | None = None,
    providers: list[Any] | None = None,
    max_unpacked_bytes: int | None = None,
    **session_options: Any,
) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` on a packed artifact or a plain ``.onnx`` file.

    Artifacts are decompressed and verified in memory (sha256 of every member; the dense-only ones
    while the session is built); their external data goes to ONNX Runtime as OrtValues on that
    memory (kept alive by the session) or as in-memory files. Extra keyword arguments are set as
    attributes of the ``SessionOptions`` (e.g. ``intra_op_num_threads=1``); a ``sess_options`` passed
    in receives the initializers and must not be reused for another model.
    """
    p = Path(path)
    so = _session_options(sess_options, session_options)
    provs = providers or ["CPUExecutionProvider"]
    if not p.is_file():
        raise ArtifactError(f"{p}: no such model or artifact file; check the path")
    if p.suffix.lower() == ".onnx" or not zipfile.is_zipfile(p):
        return ort.InferenceSession(str(p), sess_options=so, providers=provs)
    # the model protobuf, the manifest and every member not holding only dense tensor bytes are
    # verified before ONNX Runtime sees anything; the dense-only members are hashed in a thread while
    # it builds the session, and the session is returned only when they pass too
    deferred: list[tuple[str, memoryview, str]] = []
    art = _read_artifact(p, max_unpacked_bytes, False, deferred)
    wait = _hash_later(deferred, str(p))
    names: list[str] = []
    values: list[Any] = []
    complete = not art.files
    if art.files and sum(len(d) for d in art.files.values()) >= _ORTVALUE_BYTES:
        names, values, complete = _initializer_values(art.model_bytes, art.files)
    if names:  # OrtValues on the verified buffer: ONNX Runtime copies nothing
        so.add_external_initializers(names, values)
    if not complete:
        buffers = [np.frombuffer(data, dtype=np.uint8) for data in art.files.values()]
        so.add_external_initializers_from_files_in_memory(
            list(art.files), buffers, [int(b.size) for b in buffers]
        )
    # external data the artifact does not provide must not be read from the working folder:
    # point ONNX Runtime at an empty folder (it refuses absolute and escaping paths itself)
    empty = tempfile.mkdtemp(prefix="onnxcomp-nodata-")
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
    try:
        sess = ort.InferenceSession(art.model_bytes, sess_options=so, providers=provs)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        wait()  # a corrupt member explains the failure better than ONNX Runtime's message
        raise ArtifactError(f"{p}: ONNX Runtime cannot load the packed model ({exc})") from exc
    finally:
        os.rmdir(empty)
    wait()
    sess._onnxcomp_initializers = values  # the session uses their memory: keep it alive
    return sess


def unpack(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_unpacked_bytes: int | None = None,
) -> Path:
    """Write the plain model (and its data file) of an artifact into ``out_dir``; returns the model path.

    Files are written into a temporary folder beside ``out_dir`` and renamed into place only when all
    of them are complete; ``out_dir`` must not exist yet or be an empty folder.
    """
    art = read_artifact(path, max_unpacked_bytes=max_unpacked_bytes)
    dest = Path(out_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArtifactError(f"{dest}: already exists and is not an empty folder; choose another -o folder")
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.onnxcomp-"))
    try:
        for name, data in [(art.model_name, art.model_bytes), *art.files.items()]:
            target = (tmp / name).resolve()
            if tmp.resolve() not in target.parents:
                raise ArtifactError(f"{path}: member {name!r} would be written outside {dest}; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as fh:
                fh.write(data)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / art.model_name
