"""Channel dependency groups for structured pruning.

Every prunable producer (Conv with ``group=1``, Gemm, MatMul with a 2-D initializer weight) opens a
*channel space* of size ``C`` (its output channels). The analysis walks the graph in topological order
and gives every tensor a *layout*: the list of spaces its channel axis is made of (a Concat
concatenates layouts; Flatten/Reshape into a Gemm turns channel ``c`` into rows ``c·HW … c·HW+HW−1``).
Element-wise ops between two tracked tensors (residual Add, Mul gates) unite their spaces
(union-find): a *group* is such a class, and every member space keeps the same channel indices.

Each place that must shrink when channels go away is a :class:`ParamEdit` (producer weight rows,
bias, BatchNorm parameters, per-channel constants, consumer weight input rows/columns, a depthwise
Conv's weight) or a :class:`AttrEdit` (depthwise ``group``, Reshape target shape). Anything the
analysis does not understand that touches a space (a graph output, Transpose, Split, a grouped Conv,
a non-constant operand that is not tracked, …) *blocks* its group: blocked groups are left alone, so
pruning never changes a graph output's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = ["AttrEdit", "ChannelAnalysis", "Group", "ParamEdit", "Segment", "analyze"]

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Softsign", "Clip", "Identity", "Dropout", "Cast", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "LpPool", "Resize", "Upsample", "Neg", "Abs", "Exp", "Sqrt", "Gelu", "Mish",
    "Erf", "Reciprocal", "Floor", "Ceil", "Round", "ThresholdedRelu", "Celu", "Swish",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum"}


@dataclass(frozen=True)
class Segment:
    space: int
    size: int


@dataclass
class Layout:
    segments: list[Segment]
    kind: str  # "c1": channel axis 1 (NC…), "last": channel axis -1
    rank: int | None = None  # tensor rank when known (c1)
    block: int = 1  # each channel spans `block` consecutive entries of the channel axis

    @property
    def total(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass
class ParamEdit:
    """Keep, along ``axis`` of initializer ``value``, the entries indexed by ``layout`` (× ``block``)."""

    value: ir.Value
    axis: int
    segments: list[Segment]
    block: int = 1
    node: ir.Node | None = None
    role: str = ""


@dataclass
class AttrEdit:
    """``kind="group"``: set a depthwise Conv's ``group`` to the kept count of ``segments``;
    ``kind="reshape"``: rewrite the 2-D Reshape target so its last dim is the kept count × ``block``."""

    node: ir.Node
    kind: str
    segments: list[Segment]
    block: int = 1


@dataclass
class Group:
    """A union of channel spaces pruned together."""

    id: int
    size: int
    spaces: list[int]
    producers: list[tuple[ir.Node, ir.Value, int]] = field(default_factory=list)  # node, weight, out axis
    bn_scales: list[np.ndarray] = field(default_factory=list)
    probe: str | None = None  # a tensor name holding exactly this group's channels (for data importance)
    probe_kind: str = "c1"
    blocked: list[str] = field(default_factory=list)


@dataclass
class ChannelAnalysis:
    groups: list[Group]
    params: list[ParamEdit]
    attrs: list[AttrEdit]
    space_group: dict[int, int]
    layouts: dict[str, Layout]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if not g.blocked and g.producers]


class _Union:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def add(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        return True


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.value) if a is not None else default


def analyze(model: ir.Model, *, skip: tuple[str, ...] = ()) -> ChannelAnalysis:
    """Channel spaces, groups and the edits that pruning each group needs (main graph only)."""
    import fnmatch

    graph = model.graph
    uf = _Union()
    layouts: dict[str, Layout] = {}
    params: list[ParamEdit] = []
    attrs: list[AttrEdit] = []
    blocked: dict[int, list[str]] = {}
    producers: dict[int, list[tuple[ir.Node, ir.Value, int]]] = {}
    bn_scales: dict[int, list[np.ndarray]] = {}
    probes: dict[int, tuple[str, str]] = {}
    single_use_params: dict[int, int] = {}

    def block(layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segments:
            blocked.setdefault(seg.space, []).append(reason)

    def lay(value: ir.Value | None) -> Layout | None:
        return layouts.get(value.name) if value is not None and value.name else None

    def add_param(
        value: ir.Value, axis: int, layout: Layout, node: ir.Node, role: str, block_f: int = 1
    ) -> bool:
        if value.const_value is None or not value.is_initializer():
            block(layout, f"{node.name or node.op_type}: {role} is not an initializer")
            return False
        if len(list(value.uses())) != 1:
            block(layout, f"{node.name or node.op_type}: {role} {value.name!r} is shared")
            return False
        params.append(ParamEdit(value, axis, list(layout.segments), block_f, node, role))
        single_use_params[id(value)] = single_use_params.get(id(value), 0) + 1
        return True

    def set_layout(value: ir.Value | None, layout: Layout | None) -> None:
        if value is None or layout is None or not value.name:
            return
        layouts[value.name] = layout
        if len(layout.segments) == 1 and layout.block == 1 and layout.kind in ("c1", "last"):
            probes[layout.segments[0].space] = (value.name, layout.kind)

    def consume(node: ir.Node, layout: Layout, w: ir.Value, axis: int) -> None:
        """A weight whose ``axis`` indexes the consumer's input channels."""
        arr = _const(w)
        assert arr is not None
        block_f = layout.block
        if layout.kind == "flat":
            total = layout.total
            if total == 0 or arr.shape[axis] % total:
                block(layout, f"{node.name or node.op_type}: flattened size {arr.shape[axis]} is not C·HW")
                return
            block_f = arr.shape[axis] // total
            for edit in attrs:
                if edit.kind == "reshape" and edit.block == -1 and edit.segments is layout.segments:
                    edit.block = block_f
        elif arr.shape[axis] != layout.total * block_f:
            block(
                layout,
                f"{node.name or node.op_type}: weight has {arr.shape[axis]} inputs, expected {layout.total}",
            )
            return
        add_param(
            w, axis, Layout(layout.segments, layout.kind, layout.rank, block_f), node, "input weight", block_f
        )

    for node in graph:
        name = node.name or node.op_type
        op = node.op_type
        ins = list(node.inputs)
        in_layouts = [lay(v) for v in ins]
        labels = [
            name,
            *(v.name or "" for v in node.outputs),
            *(v.name or "" for v in ins[1:2] if v is not None),
        ]
        skip_me = bool(skip) and any(fnmatch.fnmatchcase(lbl, p) for p in skip for lbl in labels if lbl)
        if node.domain not in ("", "ai.onnx"):
            for lo in in_layouts:
                block(lo, f"{name}: custom-domain op")
            continue
        x_l = in_layouts[0] if in_layouts else None

        if op in ("Conv", "Gemm", "MatMul") and len(ins) >= 2:
            w = ins[1]
            warr = _const(w) if w is not None and w.is_initializer() else None
            group = _attr(node, "group", 1) if op == "Conv" else 1
            if (
                warr is None
                or (op == "MatMul" and warr.ndim != 2)
                or (op == "Gemm" and _attr(node, "transA", 0))
            ):
                for lo in in_layouts:
                    block(lo, f"{name}: unsupported {op} form")
                continue
            if op == "Conv" and group != 1:
                if (
                    x_l is not None
                    and x_l.kind == "c1"
                    and group == x_l.total
                    and warr.shape[0] == group
                    and warr.shape[1] == 1
                ):
                    # depthwise with multiplier 1: channels pass through
                    ok = add_param(w, 0, x_l, node, "depthwise weight")
                    if ok and len(ins) > 2 and ins[2] is not None:
                        ok = add_param(ins[2], 0, x_l, node, "depthwise bias")
                    if ok:
                        attrs.append(AttrEdit(node, "group", list(x_l.segments)))
                        set_layout(node.outputs[0], x_l)
                    continue
                block(x_l, f"{name}: grouped Conv (group={group})")
                continue
            # the input side: this node consumes its input's channels
            if x_l is not None:
                if op == "Conv":
                    if x_l.kind != "c1":
                        block(x_l, f"{name}: Conv input is not NC…")
                    else:
                        consume(node, x_l, w, 1)
                elif op == "Gemm":
                    consume(node, x_l, w, 1 if _attr(node, "transB", 0) else 0)
                else:
                    consume(node, x_l, w, 0)
            for lo in in_layouts[2:]:
                block(lo, f"{name}: tracked bias input")
            if ins[0] is not None and ins[0].const_value is not None:
                continue
            # the output side: a new channel space
            if op == "Conv":
                out_axis, size, kind, rank = 0, warr.shape[0], "c1", warr.ndim
            elif op == "Gemm":
                out_axis = 0 if _attr(node, "transB", 0) else 1
                size, kind, rank = warr.shape[out_axis], "last", 2
            else:
                out_axis, size, kind, rank = 1, warr.shape[1], "last", None
            sid = uf.add(size)
            producers[sid] = [(node, w, out_axis)]
            out_l = Layout([Segment(sid, size)], kind, rank)
            if skip_me:
                block(out_l, f"{name}: skipped by name")
            add_param(w, out_axis, out_l, node, "output weight")
            if len(ins) > 2 and ins[2] is not None:
                b = _const(ins[2])
                if b is None:
                    block(out_l, f"{name}: bias is not constant")
                elif b.ndim == 1 and b.shape[0] == size:
                    add_param(ins[2], 0, out_l, node, "bias")
                elif op == "Gemm" and b.ndim == 2 and b.shape == (1, size):
                    add_param(ins[2], 1, out_l, node, "bias")
                elif b.size != 1:
                    block(out_l, f"{name}: bias shape {b.shape}")
            set_layout(node.outputs[0], out_l)
            continue

        tracked = [lo for lo in in_layouts if lo is not None]
        if not tracked:
            continue

        if op == "BatchNormalization":
            if (
                len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1
                or x_l is None
                or x_l.kind != "c1"
            ):
                block(x_l, f"{name}: BatchNormalization in training mode or not on NC…")
                continue
            ok = all(ins[i] is not None and add_param(ins[i], 0, x_l, node, "batchnorm") for i in range(1, 5))
            if ok and len(x_l.segments) == 1:
                gamma, var = _const(ins[1]), _const(ins[4])
                eps = node.attributes.get("epsilon")
                e = float(eps.value) if eps is not None else 1e-5
                if gamma is not None and var is not None:
                    bn_scales.setdefault(x_l.segments[0].space, []).append(np.abs(gamma) / np.sqrt(var + e))
            set_layout(node.outputs[0], x_l if ok else None)
            continue

        if op in _UNARY:
            if x_l is None or any(lo is not None for lo in in_layouts[1:]):
                for lo in tracked:
                    block(lo, f"{name}: channel tensor in a parameter slot")
                continue
            if op in ("Resize", "Upsample") and x_l.kind != "c1":
                block(x_l, f"{name}: Resize on a non-NC… tensor")
                continue
            set_layout(node.outputs[0], x_l)
            continue

        if op in _BINARY:
            result: Layout | None = None
            ok = True
            for lo in in_layouts:
                if lo is None:
                    continue
                if result is None:
                    result = lo
                    continue
                if (
                    result.kind != lo.kind
                    or result.block != lo.block
                    or [s.size for s in result.segments] != [s.size for s in lo.segments]
                ):
                    ok = False
                    break
                for a, b in zip(result.segments, lo.segments, strict=True):
                    if not uf.union(a.space, b.space):
                        ok = False
            if not ok or result is None:
                for lo in tracked:
                    block(lo, f"{name}: element-wise operands with different channel layouts")
                continue
            for v, lo in zip(ins, in_layouts, strict=True):
                if lo is not None or v is None:
                    continue
                arr = _const(v)
                if arr is None:
                    ok = False
                    block(result, f"{name}: non-constant operand without tracked channels")
                    break
                if arr.size == 1:
                    continue
                if result.kind == "c1":
                    rank = result.rank or 4
                    pos = arr.ndim - (rank - 1)
                else:
                    pos = arr.ndim - 1
                if pos < 0 or pos >= arr.ndim:
                    continue  # broadcast over the channel axis
                if arr.shape[pos] == 1:
                    continue
                if arr.shape[pos] != result.total * result.block:
                    ok = False
                    block(result, f"{name}: constant of shape {arr.shape} does not match the channels")
                    break
                if not add_param(v, pos, result, node, "per-channel constant", result.block):
                    ok = False
                    break
            if ok:
                set_layout(node.outputs[0], result)
            continue

        if op == "Concat":
            axis = _attr(node, "axis", 1)
            if any(lo is None for lo in in_layouts) or x_l is None:
                for lo in tracked:
                    block(lo, f"{name}: Concat with an untracked input")
                continue
            kinds = {lo.kind for lo in in_layouts if lo is not None}
            rank = x_l.rank or 4
            on_channels = (kinds == {"c1"} and axis in (1, 1 - rank)) or (kinds == {"last"} and axis == -1)
            if not on_channels or any(lo is not None and lo.block != 1 for lo in in_layouts):
                for lo in tracked:
                    block(lo, f"{name}: Concat along a non-channel axis")
                continue
            segs = [s for lo in in_layouts if lo is not None for s in lo.segments]
            set_layout(node.outputs[0], Layout(segs, x_l.kind, x_l.rank))
            continue

        if op == "Transpose" and x_l is not None and x_l.block == 1 and x_l.kind in ("c1", "last"):
            perm_a = node.attributes.get("perm")
            rank = x_l.rank
            if perm_a is not None and rank is not None and len(perm_a.value) == rank:
                perm = [int(p) for p in perm_a.value]
                axis = 1 if x_l.kind == "c1" else rank - 1
                pos = perm.index(axis)
                if pos in (1, rank - 1):
                    set_layout(node.outputs[0], Layout(x_l.segments, "c1" if pos == 1 else "last", rank))
                    continue
            block(x_l, f"{name}: Transpose that moves channels off axis 1 / -1")
            continue

        if op.startswith("Reduce") and x_l is not None and x_l.block == 1 and x_l.rank is not None:
            rank = x_l.rank
            axes_a = node.attributes.get("axes")
            axes_v = _const(ins[1]) if len(ins) > 1 else None
            axes = [
                int(a)
                for a in (axes_a.value if axes_a is not None else (axes_v if axes_v is not None else []))
            ]
            axes = sorted(a % rank for a in axes)
            keepdims = _attr(node, "keepdims", 1)
            axis = 1 if x_l.kind == "c1" else rank - 1
            if axes and axis not in axes and not any(lo is not None for lo in in_layouts[1:]):
                new_rank = rank if keepdims else rank - len(axes)
                if x_l.kind == "last":
                    set_layout(node.outputs[0], Layout(x_l.segments, "last", new_rank))
                    continue
                if keepdims or all(a > 1 for a in axes):
                    set_layout(node.outputs[0], Layout(x_l.segments, "c1", new_rank))
                    continue
            block(x_l, f"{name}: {op} over the channel axis")
            continue

        if op == "Shape" and x_l is not None and x_l.rank is not None and not node.attributes.get("start"):
            axis = 1 if x_l.kind == "c1" else x_l.rank - 1
            ok = True
            for use in node.outputs[0].uses():
                user = use.node if hasattr(use, "node") else use[0]
                idx = _const(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
                if idx is None or axis in {int(i) % x_l.rank for i in np.ravel(idx)}:
                    ok = False
            if node.outputs[0].is_graph_output():
                ok = False
            if not ok:
                block(x_l, f"{name}: Shape of a channel tensor is used for its channel count")
            continue

        if op in ("Flatten", "Reshape") and x_l is not None and x_l.kind == "c1" and x_l.block == 1:
            if op == "Flatten" and _attr(node, "axis", 1) == 1:
                set_layout(node.outputs[0], Layout(x_l.segments, "flat", 2, 1))
                continue
            if op == "Reshape":
                shape = _const(ins[1]) if len(ins) > 1 else None
                if shape is not None and shape.ndim == 1 and shape.shape[0] == 2 and shape[0] in (0, 1, -1):
                    if shape[1] == -1 or shape[0] != -1:
                        out_l = Layout(x_l.segments, "flat", 2, 1)
                        attrs.append(AttrEdit(node, "reshape", out_l.segments, -1))
                        set_layout(node.outputs[0], out_l)
                        continue
            block(x_l, f"{name}: {op} that is not a flatten into a matrix")
            continue

        for lo in tracked:
            block(lo, f"{name}: {op} is not channel-transparent")

    for out in graph.outputs:
        lo = layouts.get(out.name) if out.name else None
        block(lo, f"graph output {out.name!r}")

    # groups
    roots: dict[int, Group] = {}
    space_group: dict[int, int] = {}
    for sid in range(len(uf.parent)):
        root = uf.find(sid)
        grp = roots.get(root)
        if grp is None:
            grp = roots[root] = Group(id=len(roots), size=uf.size[root], spaces=[])
        grp.spaces.append(sid)
        grp.producers.extend(producers.get(sid, []))
        grp.bn_scales.extend(bn_scales.get(sid, []))
        grp.blocked.extend(blocked.get(sid, []))
        if grp.probe is None and sid in probes:
            grp.probe, grp.probe_kind = probes[sid]
        space_group[sid] = grp.id
    return ChannelAnalysis(list(roots.values()), params, attrs, space_group, layouts)
