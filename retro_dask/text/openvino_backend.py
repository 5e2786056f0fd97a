"""OpenVINO as the embedder's forward pass (``--embed-backend openvino``), fp32, bf16 or int8.

Reads the checked fp32 graph that ``graph_export`` exports and caches. fp32 runs
it with OpenVINO's inference precision pinned to f32 (on a CPU with AVX-512 BF16
or AMX OpenVINO would otherwise compute in bf16 unasked); bf16 asks for bf16.
int8 runs ``model.ov-int8.onnx``, written beside the export once per fingerprint:
every MatMul weight stored int8 per output channel (a DequantizeLinear in front
of the MatMul, which OpenVINO folds into a compressed fully connected layer),
with OpenVINO's dynamic quantization of the activations in groups of
``INT8_GROUP``, which keeps more of the fp32 model's accuracy than one scale per
batch. Threads are not pinned to cores: each single-thread Dask worker of a
machine would otherwise be pinned to the same one. The kernel cache per input
shape is capped (``RUNTIME_CACHE``): every length-cut batch is a new shape.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .graph_export import cached_file, exported_graph, large_model, require

OV_INT8 = "model.ov-int8.onnx"
INT8_GROUP = 32
# OpenVINO keeps compiled kernels per input shape (5,000 by default): every length-cut batch is a new
# shape, and a worker grew ~1 MB a shape; 16 kept it flat at the same speed (as MODEL_ENV does for oneDNN).
RUNTIME_CACHE = 16
# Smaller weights (biases, norms) are not worth a dequantize step.
INT8_MIN_WEIGHTS = 4096


def openvino():
    return require("openvino", "openvino")


def ov_graph(model_dir: str, dtype: str) -> Path:
    src = exported_graph(model_dir)
    if dtype in ("fp32", "bf16"):
        return src
    if dtype == "int8":
        return cached_file(src.parent, OV_INT8, lambda tmp: int8_weights(model_dir, src, tmp / OV_INT8))
    raise InputError(f"--embed-backend openvino runs fp32, bf16 or int8, not --embed-dtype {dtype}")


def int8_weights(model_dir: str, src: Path, out: Path) -> None:
    """Rewrite ``src`` with every MatMul weight int8 (symmetric, one scale per output channel) + DequantizeLinear."""
    import numpy as np

    onnx = require("onnx", "onnx")
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    dequantize = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if name not in weights or name in {d.output[0] for d in dequantize}:
            continue
        w = numpy_helper.to_array(weights[name])
        if w.ndim != 2 or w.size < INT8_MIN_WEIGHTS or w.dtype != np.float32:
            continue
        scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        model.graph.initializer.remove(weights[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}.int8"),
                                        numpy_helper.from_array(scale, f"{name}.scale"),
                                        numpy_helper.from_array(np.zeros_like(q[0]), f"{name}.zero")])
        dequantize.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero"],
                                           [name], axis=1, name=f"{name}.dequantize"))
    nodes = dequantize + list(model.graph.node)  # the dequantized weights first: the graph stays sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out), save_as_external_data=large_model(model_dir))


class OpenVinoEncoder:
    """A compiled OpenVINO model of an encoder graph: ``encoder(input_ids, attention_mask)`` -> torch hidden states."""

    def __init__(self, path: str | Path, dtype: str, threads: int):
        ov = openvino()
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": max(1, int(threads)), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" else "f32",
                  "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE}
        if dtype == "int8":
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = INT8_GROUP
        self.path = Path(path)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def run_numpy(self, input_ids, attention_mask):
        # A copy: the request reuses its output buffer on the next call.
        return self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})[self.output].copy()

    def __call__(self, input_ids, attention_mask):
        import torch

        return torch.from_numpy(self.run_numpy(input_ids.cpu().numpy(), attention_mask.cpu().numpy()))


def load_openvino_encoder(model_dir: str, dtype: str, threads: int) -> OpenVinoEncoder:
    return OpenVinoEncoder(ov_graph(model_dir, dtype), dtype, threads)
