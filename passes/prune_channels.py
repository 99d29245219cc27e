"""Structured channel pruning (``prune-channels``): remove whole output channels and shrink the graph.

For every prunable dependency group (see :mod:`onnxcomp.passes.channel_groups`) of ``C`` channels,
``⌊ratio·C⌋`` channels with the lowest importance are removed, then the kept count is rounded up to a
multiple of ``round_to`` and kept at least ``min_channels``. Importance of channel ``c``:

* ``l1``/``l2``: ``Σ_p ‖W_p[c]‖ / mean_c ‖W_p[c]‖`` over the group's producers ``p`` (times the
  normalised ``|γ_c|/sqrt(σ²_c+ε)`` of a following BatchNormalization);
* ``activation``: mean ``|x_c|`` of the group's tensor on calibration data.

Every edit is applied to the initializers themselves (producer rows, bias, BatchNorm, per-channel
constants, consumer input columns incl. Flatten→Gemm blocks, depthwise Conv weights and ``group``):
the saved model is really smaller and no masks are left behind.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import CalibrationError
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass
from onnxcomp.passes import channel_groups as cg

__all__ = ["PruneChannelsConfig", "PruneChannelsPass", "channel_importance", "kept_count"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneChannelsConfig:
    """Options of the ``prune-channels`` pass."""

    #: fraction of channels removed in every prunable group
    ratio: float = 0.3
    importance: Literal["l1", "l2", "activation"] = "l1"
    min_channels: int = 1
    #: round the kept channel count up to a multiple of this (e.g. 8 for vector units)
    round_to: int = 1
    #: node-name patterns (fnmatch) whose output channels are never pruned
    skip: tuple[str, ...] = ()
    calibration_samples: int = 32
    #: after pruning, refit every Conv(group=1)/Gemm/MatMul weight and bias by least squares so the
    #: layer reproduces the original model's (kept) outputs from the pruned model's inputs (needs data)
    refit: bool = False
    damping: float = 0.01
    #: with calibration data, fold the mean of every removed input channel into the consumer's bias
    #: (``b += Σ_c E[x_c]·Σ_k W[:, c, k]``), so dropped channels leave their average contribution behind
    compensate: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        if self.min_channels < 1:
            raise ValueError("min_channels must be >= 1")
        if self.round_to < 1:
            raise ValueError("round_to must be >= 1")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be >= 1")


def kept_count(size: int, ratio: float, *, min_channels: int = 1, round_to: int = 1) -> int:
    """``keep = size − ⌊ratio·size⌋`` rounded up to a multiple of ``round_to``, within ``[min_channels, size]``."""
    keep = size - math.floor(ratio * size + 1e-9)
    keep = math.ceil(keep / round_to) * round_to
    return int(min(size, max(keep, min_channels)))


def channel_importance(group: cg.Group, norm: Literal["l1", "l2"]) -> np.ndarray:
    """Weight-norm importance of the group's channels (see module doc)."""
    total = np.zeros(group.size, dtype=np.float64)
    for _node, w, axis in group.producers:
        arr = np.moveaxis(np.asarray(w.const_value.numpy(), dtype=np.float64), axis, 0).reshape(
            group.size, -1
        )
        n = np.abs(arr).sum(axis=1) if norm == "l1" else np.sqrt((arr * arr).sum(axis=1))
        mean = float(n.mean()) or 1.0
        total += n / mean
    for scale in group.bn_scales:
        mean = float(np.mean(scale)) or 1.0
        total *= scale / mean
    return total


def _activation_importance(
    model: ir.Model, groups: list[cg.Group], ctx: PassContext, samples: int
) -> dict[int, np.ndarray]:
    from onnxcomp.passes.prune import stream_layer_inputs

    if ctx.calibration is None:
        raise CalibrationError(
            "prune-channels: importance 'activation' needs calibration data; give a [calibration] table or use 'l1'"
        )
    probes = {g.id: g.probe for g in groups if g.probe}
    sums: dict[int, np.ndarray] = {}
    count = 0

    def limited() -> Any:
        for i, sample in enumerate(ctx.calibration_samples()):
            if i >= samples:
                return
            yield sample

    kinds = {g.id: g.probe_kind for g in groups}
    for values in stream_layer_inputs(model, sorted(set(probes.values())), limited()):
        for gid, name in probes.items():
            x = np.abs(np.asarray(values[name], dtype=np.float64))
            x = np.moveaxis(x, 1 if kinds[gid] == "c1" else -1, 0).reshape(
                x.shape[1 if kinds[gid] == "c1" else -1], -1
            )
            sums[gid] = sums.get(gid, 0.0) + x.mean(axis=1)
        count += 1
    if count == 0:
        raise CalibrationError("prune-channels: the calibration source gave no samples")
    return {gid: s / count for gid, s in sums.items()}


def _indices(segments: list[cg.Segment], kept: dict[int, np.ndarray], block: int) -> np.ndarray:
    parts, offset = [], 0
    for seg in segments:
        idx = kept.get(seg.space)
        idx = np.arange(seg.size) if idx is None else idx
        parts.append(idx + offset)
        offset += seg.size
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if block > 1:
        flat = (flat[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return flat.astype(np.int64)


@register_pass
class PruneChannelsPass(Pass):
    """Remove whole output channels of Conv/Gemm/MatMul and everything that depends on them."""

    name: ClassVar[str] = "prune-channels"
    Config: ClassVar[type] = PruneChannelsConfig
    needs_calibration: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        cfg: PruneChannelsConfig = self.config
        from onnxcomp.passes.prune import fold_weight_reshapes

        folded = fold_weight_reshapes(model)
        analysis = cg.analyze(model, skip=cfg.skip)
        prunable = analysis.prunable()
        act = (
            _activation_importance(model, prunable, ctx, cfg.calibration_samples)
            if cfg.importance == "activation" and prunable
            else {}
        )
        kept_by_space: dict[int, np.ndarray] = {}
        original = ir.to_proto(model) if cfg.refit and prunable else None
        if cfg.refit and prunable and ctx.calibration is None:
            raise CalibrationError(
                "prune-channels: refit needs calibration data; give a [calibration] table or set refit = false"
            )
        groups_info: list[dict[str, Any]] = []
        for group in prunable:
            keep = kept_count(group.size, cfg.ratio, min_channels=cfg.min_channels, round_to=cfg.round_to)
            if keep >= group.size:
                continue
            if group.id in act:
                score = act[group.id]
            else:
                score = channel_importance(group, "l2" if cfg.importance == "l2" else "l1")
            order = np.argsort(-score, kind="stable")[:keep]
            kept = np.sort(order)
            for sid in group.spaces:
                kept_by_space[sid] = kept
            groups_info.append(
                {
                    "producers": [n.name or n.op_type for n, _w, _a in group.producers],
                    "channels": group.size,
                    "kept": int(keep),
                }
            )
        kept_rows: dict[int, np.ndarray] = {}
        for group in prunable:
            for node, _w, _axis in group.producers:
                sid = next((sp for sp in group.spaces if sp in kept_by_space), None)
                if sid is not None:
                    kept_rows[id(node)] = kept_by_space[sid]
        compensation: list[tuple[ir.Node, np.ndarray]] = []
        if cfg.compensate and kept_by_space and ctx.calibration is not None:
            compensation = _compensation(model, analysis, kept_by_space, ctx, cfg.calibration_samples)
        params_before = _param_count(model)
        for edit in analysis.params:
            if not any(seg.space in kept_by_space for seg in edit.segments):
                continue
            idx = _indices(edit.segments, kept_by_space, edit.block)
            arr = edit.value.const_value.numpy()
            new = np.ascontiguousarray(np.take(arr, idx, axis=edit.axis))
            edit.value.const_value = ir.tensor(new, name=edit.value.name)
            edit.value.shape = ir.Shape(new.shape)
        for attr_edit in analysis.attrs:
            if not any(seg.space in kept_by_space for seg in attr_edit.segments):
                continue
            count = _indices(attr_edit.segments, kept_by_space, 1).size
            if attr_edit.kind == "group":
                attr_edit.node.attributes["group"] = ir.AttrInt64("group", count)
            else:
                shape_v = attr_edit.node.inputs[1]
                old = shape_v.const_value.numpy()
                new_shape = np.array([old[0], count * max(attr_edit.block, 1)], dtype=np.int64)
                if old[1] == -1:
                    new_shape = old.astype(np.int64)
                from onnxcomp.passes.prune import _new_value

                value = _new_value(model, f"{shape_v.name}_pruned", new_shape)
                attr_edit.node.replace_input_with(1, value)
                if (
                    not list(shape_v.uses())
                    and shape_v.name in model.graph.initializers
                    and not shape_v.is_graph_input()
                ):
                    del model.graph.initializers[shape_v.name]
        if kept_by_space:
            outputs = {v.name for v in model.graph.outputs}
            for node in model.graph:
                for out in node.outputs:
                    lo = analysis.layouts.get(out.name or "")
                    if (
                        lo is not None
                        and out.name not in outputs
                        and any(s.space in kept_by_space for s in lo.segments)
                    ):
                        out.shape = None
        compensated = _apply_compensation(model, compensation, kept_rows)
        refitted: list[str] = []
        if cfg.refit and kept_by_space:
            refitted = _refit_layers(model, original, kept_rows, ctx, cfg)
        params_after = _param_count(model)
        reasons = Counter(r.split(": ", 1)[-1] for g in analysis.groups for r in g.blocked[:1])
        details = {
            "ratio": cfg.ratio,
            "importance": cfg.importance,
            "groups": len(analysis.groups),
            "groups_prunable": len(prunable),
            "groups_pruned": len(groups_info),
            "channels_before": int(sum(g["channels"] for g in groups_info)),
            "channels_after": int(sum(g["kept"] for g in groups_info)),
            "params_before": params_before,
            "params_after": params_after,
            "pruned": groups_info,
            "blocked_reasons": dict(reasons.most_common(10)),
            "weights_folded": folded,
            "refitted_layers": refitted,
            "bias_compensated_layers": compensated,
        }
        return PassResult(changed=bool(kept_by_space) or bool(folded), details=details)


def _param_count(model: ir.Model) -> int:
    return int(
        sum(
            int(np.prod(v.const_value.shape.numpy())) if v.const_value.shape.numpy() else 1
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
    )


def _refit_layers(
    model: ir.Model,
    original: Any,
    kept_rows: dict[int, np.ndarray],
    ctx: PassContext,
    cfg: PruneChannelsConfig,
) -> list[str]:
    """Sequential dense refit (see ``prune_numerics.refit_dense``) of every Conv(group=1)/Gemm/MatMul,
    in topological order, bias included (own bias input, a following per-channel Add, or a new one)."""
    from onnxcomp.ort_session import session_from_model, session_options
    from onnxcomp.passes import prune as up
    from onnxcomp.passes import prune_numerics as pn

    orig_model = ir.from_proto(original)
    orig_inits = {
        name: v.const_value.numpy()
        for name, v in orig_model.graph.initializers.items()
        if v.const_value is not None
    }
    layers, _ = up.find_layers(model, op_types=("Conv", "Gemm", "MatMul"))
    layers = [layer for layer in layers if layer.groups == 1 and layer.weight.name in orig_inits]
    if not layers:
        return []
    acts = [a for a in dict.fromkeys(layer.activation for layer in layers) if a]
    graph_inputs = {v.name for v in orig_model.graph.inputs}
    reference = session_from_model(
        orig_model,
        extra_outputs=[a for a in acts if a not in graph_inputs],
        only_extra_outputs=True,
        options=session_options(optimization="basic"),
    )
    cfg_pair = up.PruneConfig(calibration_samples=cfg.calibration_samples)
    done: list[str] = []
    with up._single_blas(), ctx.progress.task("prune-channels: refit", total=len(layers)) as step:
        for layer in layers:
            w_now = layer.array()
            w_orig = orig_inits[layer.weight.name]
            target = layer.to_matrix(w_orig.astype(np.float64))
            rows = kept_rows.get(id(layer.node))
            if rows is not None:
                target = target[rows]
            init = layer.to_matrix(w_now.astype(np.float64))
            if target.shape[0] != init.shape[0]:
                step(1)
                continue
            up._collect_pair(model, reference, layer, ctx, cfg_pair)
            kind, slot = up._bias_slot(layer)
            gram, cross = layer.stats["gram"][0], layer.stats["cross"][0]
            if kind:
                n = float(layer.stats["rows"])
                s_cur, s_ref = layer.stats["colsum"][0], layer.stats["refsum"][0]
                gram = np.block([[gram, s_cur[:, None]], [s_cur[None, :], np.array([[n]])]])
                cross = np.block([[cross, s_cur[:, None]], [s_ref[None, :], np.array([[n]])]])
                b_target = np.zeros(target.shape[0])
                b_now = np.zeros(target.shape[0])
                if kind == "input":
                    bias_name = layer.node.inputs[2].name
                    b_orig = orig_inits.get(bias_name)
                    if b_orig is not None:
                        b_orig = b_orig.reshape(-1).astype(np.float64)
                        b_target = b_orig[rows] if rows is not None else b_orig
                    b_now = slot.const_value.numpy().reshape(-1).astype(np.float64)
                target = np.hstack([target, b_target[:, None]])
                init = np.hstack([init, b_now[:, None]])
            new = pn.refit_dense(target, gram, cross, init, damping=cfg.damping)
            if kind:
                new, b_new = new[:, :-1], new[:, -1]
                if kind == "input":
                    arr = slot.const_value.numpy()
                    slot.const_value = ir.tensor(b_new.reshape(arr.shape).astype(arr.dtype), name=slot.name)
                else:
                    up._apply_bias(model, layer, kind, slot, b_new)
            w_new = layer.from_matrix(new, w_now.shape).astype(w_now.dtype)
            layer.weight.const_value = ir.tensor(np.ascontiguousarray(w_new), name=layer.weight.name)
            done.append(layer.name)
            step(1)
    return done


def _compensation(
    model: ir.Model,
    analysis: cg.ChannelAnalysis,
    kept_by_space: dict[int, np.ndarray],
    ctx: PassContext,
    samples: int,
) -> list[tuple[ir.Node, np.ndarray]]:
    """Per consumer node: ``Δb[o] = Σ_{removed j} E[x_j]·Σ_k W[o, j, k]`` (original sizes)."""
    from onnxcomp.passes.prune import stream_layer_inputs

    edits = [
        e
        for e in analysis.params
        if e.role == "input weight"
        and e.node is not None
        and any(s.space in kept_by_space for s in e.segments)
    ]
    names = sorted(
        {e.node.inputs[0].name for e in edits if e.node.inputs[0] is not None and e.node.inputs[0].name}
    )
    if not names:
        return []
    sums: dict[str, np.ndarray] = {}
    count = 0

    def limited() -> Any:
        for i, sample in enumerate(ctx.calibration_samples()):
            if i >= samples:
                return
            yield sample

    for values in stream_layer_inputs(model, names, limited()):
        for name in names:
            x = np.asarray(values[name], dtype=np.float64)
            lo = analysis.layouts.get(name)
            axis = 1 if lo is None or lo.kind in ("c1", "flat") else x.ndim - 1
            sums[name] = sums.get(name, 0.0) + np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).mean(axis=1)
        count += 1
    if count == 0:
        return []
    out: list[tuple[ir.Node, np.ndarray]] = []
    for e in edits:
        assert e.node is not None
        name = e.node.inputs[0].name or ""
        mean = sums[name] / count
        kept = _indices(e.segments, kept_by_space, e.block)
        removed = np.setdiff1d(np.arange(mean.shape[0]), kept)
        w = np.asarray(e.value.const_value.numpy(), dtype=np.float64)
        if removed.size == 0 or w.shape[e.axis] != mean.shape[0]:
            continue
        wr = np.moveaxis(np.take(w, removed, axis=e.axis), e.axis, 0)  # [removed, ...]
        if e.node.op_type == "Conv":  # [removed, O, k...] → Σ_k
            contrib = np.einsum(
                "r,ro->o", mean[removed], wr.reshape(wr.shape[0], wr.shape[1], -1).sum(axis=2)
            )
        else:  # Gemm/MatMul: [removed, out]
            contrib = mean[removed] @ wr.reshape(wr.shape[0], -1)
        out.append((e.node, contrib))
    return out


def _apply_compensation(
    model: ir.Model, compensation: list[tuple[ir.Node, np.ndarray]], kept_rows: dict[int, np.ndarray]
) -> list[str]:
    from onnxcomp.passes import prune as up

    done = []
    for node, delta in compensation:
        layer = up.Layer(node=node, weight=node.inputs[1], op=node.op_type)
        if node.op_type == "Gemm":
            layer.trans_b = bool(node.attributes.get("transB") and node.attributes["transB"].value)
        rows = kept_rows.get(id(node))
        if rows is not None:
            delta = delta[rows]
        kind, slot = up._bias_slot(layer)
        if not kind:
            continue
        if (
            kind != "new"
            and slot is not None
            and slot.const_value is not None
            and slot.const_value.numpy().size != delta.size
        ):
            continue
        up._apply_bias(model, layer, kind, slot, delta)
        done.append(node.name or node.op_type)
    return done
