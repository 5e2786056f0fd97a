"""The int8 graph OpenVINO runs for ``--embed-dtype int8``, made to keep the fp32 model's neighbours.

Every large MatMul weight of the checked fp32 graph is stored as uint8, one
scale and zero point per output channel, behind a DequantizeLinear that
OpenVINO folds into a compressed fully connected layer whose activations it
quantizes per token group at run time. Rounding every weight to its nearest
step (what the first int8 graph did) cost 0.02 of recall@10; three steps on
activations recorded from calibration text (``CALIBRATION_TEXTS`` pieces of
the packaged sample corpus) cut the embedding error ~4x (RESULTS.md, profiling
note 32):

- smoothing (SmoothQuant): each input channel j of a MatMul is divided by
  ``s_j = sqrt(amax_x(j) / amax_w(j))`` in a Mul in front of it and the weight's
  row j multiplied by it: the product is the same, and the activation outliers
  that the run-time quantization would round coarsely move into the weights;
- GPTQ: the weights are rounded one input channel at a time, largest
  activation energy first, each rounding error spread over the channels not yet
  rounded through the inverse of ``X^T X``: what is kept small is the error of
  the MatMul's output on real activations, not of each weight;
- asymmetric steps (uint8 and a zero point): the full 256 levels over each
  channel's own range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .batch_arrays import pad_batch
from .graph_export import large_model, probe_ids, require

CALIBRATION_TEXTS = 512
CALIBRATION_SEED = 11
CALIBRATION_BATCH = 64
# Weights smaller than this (biases, norms, tiny projections) are not worth a dequantize step.
MIN_WEIGHTS = 4096
# GPTQ's damping of X^T X (a share of its mean diagonal) and the columns rounded per block update.
DAMPING = 0.01
GPTQ_BLOCK = 128
# The X^T X matrices held at once (float64); a larger model is calibrated in several passes.
STATS_BYTES = 512 << 20


def quantized_matmuls(model) -> list[tuple[str, str]]:
    """(activation, weight) names of the MatMuls whose weight is a 2-D fp32 initializer of MIN_WEIGHTS or more,
    used by that MatMul alone."""
    from onnx import TensorProto

    weights = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        if len(w.dims) == 2 and w.data_type == TensorProto.FLOAT and np.prod(w.dims) >= MIN_WEIGHTS \
                and uses[node.input[1]] == 1:
            out.append((node.input[0], node.input[1]))
    return out


def calibration_batches(model_dir: str) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = sorted(probe_ids(model_dir, CALIBRATION_TEXTS, seed=CALIBRATION_SEED), key=len)
    return [pad_batch(ids[i : i + CALIBRATION_BATCH]) for i in range(0, len(ids), CALIBRATION_BATCH)]


def activation_stats(src: Path, activations: list[str], batches) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each activation tensor: ``X^T X`` (float64) and the largest |x| per channel over the real tokens."""
    ov = require("openvino", "openvino")
    core = ov.Core()
    model = core.read_model(str(src))
    model.add_outputs(activations)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ids, mask in batches:
        values = {name: v for port, v in compiled({"input_ids": ids, "attention_mask": mask}).items()
                  for name in port.get_names()}
        real = mask.reshape(-1).astype(bool)
        for name in activations:
            x = values[name].reshape(-1, values[name].shape[-1])[real].astype(np.float64)
            h, amax = stats.get(name, (0.0, 0.0))
            stats[name] = (h + x.T @ x, np.maximum(amax, np.abs(x).max(axis=0)))
    return stats


def smoothing(amax_x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """SmoothQuant's per-input-channel factor (alpha 1/2) for a weight ``w`` [in, out]."""
    amax_w = np.abs(w).max(axis=1)
    return np.sqrt(np.maximum(amax_x, 1e-5) / np.maximum(amax_w, 1e-5))


def gptq(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round ``w`` [out, in] to uint8 per output row (asymmetric), GPTQ order and error feedback through ``h``
    [in, in]; return (q [out, in], scale [out], zero point [out])."""
    w = w.astype(np.float64)
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular
    q = np.empty_like(w)
    n = w.shape[1]
    for a in range(0, n, GPTQ_BLOCK):
        b = min(a + GPTQ_BLOCK, n)
        block, err = w[:, a:b].copy(), np.empty((w.shape[0], b - a))
        for i in range(b - a):
            q[:, a + i] = np.clip(np.rint(block[:, i] / scale) + zero, 0, 255)
            err[:, i] = (block[:, i] - (q[:, a + i] - zero) * scale) / hinv[a + i, a + i]
            block[:, i:] -= np.outer(err[:, i], hinv[a + i, a + i : b])
        w[:, b:] -= err @ hinv[a:b, b:]
    out = np.empty_like(q)
    out[:, order] = q
    return out.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def stat_groups(model, matmuls: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The matmuls in groups whose X^T X fit STATS_BYTES together (one calibration pass each)."""
    dims = {t.name: t.dims for t in model.graph.initializer}
    groups: list[list[tuple[str, str]]] = [[]]
    held = 0
    for x, w in matmuls:
        size = int(dims[w][0]) ** 2 * 8
        if groups[-1] and held + size > STATS_BYTES:
            groups.append([])
            held = 0
        groups[-1].append((x, w))
        held += size
    return groups


def write_int8_graph(model_dir: str, src: Path, out: Path) -> None:
    """Rewrite the fp32 graph ``src`` into ``out``: every quantized MatMul smoothed, its weight GPTQ-rounded to
    uint8 behind a DequantizeLinear."""
    onnx = require("onnx", "onnx")
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    matmuls = quantized_matmuls(model)
    weights = {t.name: t for t in model.graph.initializer}
    batches = calibration_batches(model_dir)
    front, smooth_of = [], {}
    for group in stat_groups(model, matmuls):
        stats = activation_stats(src, sorted({x for x, _ in group}), batches)
        for x, name in group:
            w = numpy_helper.to_array(weights[name]).astype(np.float64)
            h, amax = stats[x]
            s = smoothing(amax, w)
            q, scale, zero = gptq((w * s[:, None]).T, h / np.outer(s, s))
            model.graph.initializer.remove(weights[name])
            model.graph.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(q.T), f"{name}.uint8"),
                numpy_helper.from_array(scale, f"{name}.scale"), numpy_helper.from_array(zero, f"{name}.zero"),
                numpy_helper.from_array((1.0 / s).astype(np.float32), f"{name}.smooth")])
            front.append(helper.make_node("DequantizeLinear", [f"{name}.uint8", f"{name}.scale", f"{name}.zero"],
                                          [name], axis=1, name=f"{name}.dequantize"))
            smooth_of[name] = helper.make_node("Mul", [x, f"{name}.smooth"], [f"{name}.smoothed"],
                                               name=f"{name}.smooth")
    nodes = list(front)  # the dequantized weights first, each smoothing right before its MatMul: still sorted
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in smooth_of:
            nodes.append(smooth_of[node.input[1]])
            node.input[0] = f"{node.input[1]}.smoothed"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out), save_as_external_data=large_model(model_dir))
