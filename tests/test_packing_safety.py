"""Hand-crafted malicious or broken artifacts are refused with a clear error and leave nothing on disk."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

from onnxcomp.errors import OnnxcompError
from onnxcomp.packing import pack_model
from onnxcomp.runtime import ArtifactError, load_session, read_artifact, read_manifest, unpack


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid artifact with a dense data member and a sparse region member."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[np.abs(w) < 1.2] = 0
    v = rng.standard_normal((64, 32)).astype(np.float32)
    model = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,64] x) => (float[1,32] y) <float[64,64] W, float[64,32] V> { h = MatMul(x, W) \n y = MatMul(h, V) }""",
        initializers=[ir.tensor(w, name="W"), ir.tensor(v, name="V")],
    )
    path = tmp_path_factory.mktemp("art") / "good.zip"
    pack_model(model, path, sparse="csr")
    return path


def _members(path: Path) -> tuple[dict[str, Any], list[tuple[zipfile.ZipInfo, bytes]]]:
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        items = [(i, zf.read(i.filename)) for i in zf.infolist() if i.filename != "manifest.json"]
    return manifest, items


def _write(
    dest: Path,
    manifest: dict[str, Any],
    items: list[tuple[zipfile.ZipInfo | str, bytes]],
) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names warn
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest))
            for info, data in items:
                zf.writestr(info, data)
    return dest


def _mutate(src: Path, dest: Path, fn: Callable[[dict[str, Any], list[tuple[Any, bytes]]], None]) -> Path:
    manifest, items = _members(src)
    fn(manifest, items)
    return _write(dest, manifest, items)


def _refused(path: Path, match: str, **kwargs: Any) -> None:
    out = path.parent / f"{path.stem}-out"
    with pytest.raises(ArtifactError, match=match):
        load_session(path, **kwargs)
    with pytest.raises(ArtifactError, match=match):
        unpack(path, out, **kwargs)
    assert not out.exists()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_the_valid_artifact_loads(artifact: Path) -> None:
    sess = load_session(artifact)
    assert sess.run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 32)
    assert issubclass(ArtifactError, OnnxcompError)


@pytest.mark.parametrize(
    "name",
    ["../evil.onnx", "/etc/evil", "a/../../evil", "C:/evil", "a\\..\\evil", "./model", "a//b", "dir/"],
)
def test_names_escaping_the_folder_are_refused(artifact: Path, tmp_path: Path, name: str) -> None:
    def add(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        items.append((zipfile.ZipInfo(name), b"x"))
        manifest["members"].append({"name": name, "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()})

    bad = _mutate(artifact, tmp_path / "bad.zip", add)
    _refused(bad, "refusing|folder")


def test_symlink_member_is_refused(artifact: Path, tmp_path: Path) -> None:
    def add(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        items.append((info, b"/etc/passwd"))
        manifest["members"].append(
            {"name": "link", "size": 11, "sha256": hashlib.sha256(b"/etc/passwd").hexdigest()}
        )

    _refused(_mutate(artifact, tmp_path / "bad.zip", add), "symbolic link")


def test_duplicate_names_are_refused(artifact: Path, tmp_path: Path) -> None:
    def dup(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        items.append((items[0][0].filename, b"evil"))

    _refused(_mutate(artifact, tmp_path / "bad.zip", dup), "more than once")


def test_size_disagreeing_with_manifest_is_refused(artifact: Path, tmp_path: Path) -> None:
    def shrink(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["members"][0]["size"] -= 1

    _refused(_mutate(artifact, tmp_path / "bad.zip", shrink), "manifest says|add up to")

    def shrink_both(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["members"][0]["size"] -= 1
        manifest["solid"]["parts"][-1]["size"] -= 1

    _refused(_mutate(artifact, tmp_path / "bad2.zip", shrink_both), "manifest says")


@pytest.mark.parametrize("name", ["../evil.onnx", "/abs", "a/./b"])
def test_solid_part_names_escaping_the_folder_are_refused(artifact: Path, tmp_path: Path, name: str) -> None:
    def rename(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        assert manifest["solid"]["members"] == ["payload"]
        manifest["solid"]["parts"][0]["name"] = name

    _refused(_mutate(artifact, tmp_path / "bad.zip", rename), "refusing|folder")


def test_solid_parts_must_be_unique_and_add_up(artifact: Path, tmp_path: Path) -> None:
    def dup(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        parts = manifest["solid"]["parts"]
        parts[1]["name"] = parts[0]["name"]

    _refused(_mutate(artifact, tmp_path / "dup.zip", dup), "twice")

    def grow(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["solid"]["parts"][0]["size"] += 5

    _refused(_mutate(artifact, tmp_path / "grow.zip", grow), "add up to")

    def unknown(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["solid"]["members"] = ["payload", "payload"]

    _refused(_mutate(artifact, tmp_path / "unknown.zip", unknown), "unknown or repeated")


def test_zip_bomb_is_refused_before_decompressing(tmp_path: Path) -> None:
    data = bytes(50 << 20)  # 50 MiB of zeros deflate to ~50 KiB
    manifest = {
        "format": "onnxcomp-artifact",
        "format_version": 1,
        "model": "model.onnx",
        "members": [{"name": "model.onnx", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
    }
    bomb = _write(tmp_path / "bomb.zip", manifest, [("model.onnx", data)])
    assert bomb.stat().st_size < 1 << 20
    _refused(bomb, "above the limit", max_unpacked_bytes=10 << 20)


def test_bad_checksum_is_refused(artifact: Path, tmp_path: Path) -> None:
    def corrupt(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        info, data = items[-1]
        items[-1] = (info, bytes([data[0] ^ 0xFF]) + data[1:])

    _refused(_mutate(artifact, tmp_path / "bad.zip", corrupt), "sha256")


def test_bad_rebuilt_data_checksum_is_refused(artifact: Path, tmp_path: Path) -> None:
    def corrupt(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["external_data"]["sha256"] = "0" * 64

    bad = _mutate(artifact, tmp_path / "bad.zip", corrupt)
    with pytest.raises(ArtifactError, match="rebuilt data file"):
        read_artifact(bad)
    with pytest.raises(ArtifactError, match="rebuilt data file"):
        unpack(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    load_session(bad)  # load_session checks every member; the rebuild check guards only the decoders


def test_inconsistent_sparse_indices_are_refused(artifact: Path, tmp_path: Path) -> None:
    def corrupt(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["external_data"]["regions"][0]["cols"] = 1  # indices now run past their row

    _refused(_mutate(artifact, tmp_path / "bad.zip", corrupt), "sizes disagree|inconsistent")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version_is_refused(artifact: Path, tmp_path: Path, version: Any) -> None:
    def bump(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        manifest["format_version"] = version

    bad = _mutate(artifact, tmp_path / "bad.zip", bump)
    _refused(bad, "format version|format_version")
    if version == 2:
        with pytest.raises(ArtifactError, match="newer onnxcomp"):
            read_manifest(bad)


def test_unlisted_and_missing_members_are_refused(artifact: Path, tmp_path: Path) -> None:
    def extra(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        items.append(("extra.bin", b"hi"))

    _refused(_mutate(artifact, tmp_path / "bad1.zip", extra), "unlisted member")

    def missing(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        items.pop()

    _refused(_mutate(artifact, tmp_path / "bad2.zip", missing), "missing member")


def test_not_a_zip_and_no_manifest(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ArtifactError, match="not a zip"):
        unpack(junk, tmp_path / "o")
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as zf:
        zf.writestr("model.onnx", b"x")
    _refused(tmp_path / "plain.zip", "no manifest.json")


def test_crc_corruption_is_refused(artifact: Path, tmp_path: Path) -> None:
    raw = bytearray(artifact.read_bytes())
    with zipfile.ZipFile(artifact) as zf:
        info = zf.getinfo(read_manifest(artifact)["members"][-1]["name"])
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0x55
    bad = tmp_path / "crc.zip"
    bad.write_bytes(bytes(raw))
    _refused(bad, "corrupt|sha256")


def test_unpack_refuses_a_non_empty_destination(artifact: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an empty folder"):
        unpack(artifact, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    model = unpack(artifact, empty)
    assert model.parent == empty and sorted(p.name for p in empty.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
    ]
    assert read_artifact(artifact).files["model.onnx.data"] == (empty / "model.onnx.data").read_bytes()


def test_external_data_outside_the_artifact_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packed model naming a data file the artifact does not hold must not read it from disk."""
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    for location in ("secret.bin", "../secret.bin", str(tmp_path / "secret.bin")):
        t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[16])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "64")):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        graph = helper.make_graph(
            [helper.make_node("Identity", ["W"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
            initializer=[t],
        )
        data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        manifest = {
            "format": "onnxcomp-artifact",
            "format_version": 1,
            "model": "model.onnx",
            "members": [
                {"name": "model.onnx", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            ],
        }
        art = _write(tmp_path / "evil.zip", manifest, [("model.onnx", data)])
        with pytest.raises(ArtifactError, match="cannot load the packed model"):
            load_session(art)


def test_corrupt_dense_member_hashed_during_session_creation_is_refused(tmp_path: Path) -> None:
    """load_session hashes the members holding only dense tensor bytes while ONNX Runtime builds the
    session; a bad one still refuses the artifact (no session is returned)."""
    from onnxcomp.packing import PackConfig
    from onnxcomp.runtime import _read_artifact

    rng = np.random.default_rng(3)
    codes = np.clip(np.rint(rng.standard_normal((256, 512)) * 20), -127, 127).astype(np.int8)
    model = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,256] x) => (float[1,512] y) <int8[256,512] C, float s> {
            w = DequantizeLinear(C, s)
            y = MatMul(x, w)
        }""",
        initializers=[ir.tensor(codes, name="C"), ir.tensor(np.array(0.01, np.float32), name="s")],
    )
    good = tmp_path / "good.zip"
    pack_model(model, good, config=PackConfig(solid_chunk_bytes=1 << 16))
    deferred: list[Any] = []
    _read_artifact(good, None, False, deferred)
    assert len(deferred) >= 2  # the check below exercises the deferred path
    assert load_session(good).run(None, {"x": np.ones((1, 256), np.float32)})[0].shape == (1, 512)
    last = deferred[-1][0]

    def corrupt(manifest: dict[str, Any], items: list[tuple[Any, bytes]]) -> None:
        for k, (info, data) in enumerate(items):
            if info.filename == last:
                items[k] = (info, data[:100] + bytes([data[100] ^ 0x01]) + data[101:])

    _refused(_mutate(good, tmp_path / "bad.zip", corrupt), f"{last}.*sha256")
