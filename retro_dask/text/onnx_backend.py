"""ONNX Runtime as the embedder's forward pass (``--embed-backend onnx``), fp32 or int8.

fp32 runs the checked graph that ``graph_export`` exports and caches, with the
session's own graph optimizations (ONNX Runtime's offline BERT optimizer gained
under 5% more on all-MiniLM-L6-v2, within the noise: not worth a second graph).
int8 runs ``model.ort-int8.onnx``, written beside the export once per
fingerprint: dynamic quantization, the weights of every MatMul int8 per output
channel, activations quantized per batch at run time (``-rr`` where the CPU has
no VNNI, whose u8 x s8 multiply can saturate without a reduced range).
``OrtEncoder`` runs one of them as ``(input_ids, attention_mask) -> last hidden
states`` with the worker's threads.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..formats.faiss_index import cpu_flags
from .graph_export import cached_file, exported_graph, large_model, require

ORT_INT8 = "model.ort-int8.onnx"
# CPU flags with the u8 x s8 dot product that dynamic int8 needs at full range.
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def onnxruntime():
    return require("onnxruntime", "onnxruntime")


def ort_graph(model_dir: str, dtype: str) -> Path:
    """The graph ONNX Runtime runs for ``dtype`` (fp32 or int8), made from the export on first use."""
    src = exported_graph(model_dir)
    if dtype == "fp32":
        return src
    if dtype == "int8":
        reduce_range = not (VNNI_FLAGS & cpu_flags())
        name = ORT_INT8.replace(".onnx", "-rr.onnx") if reduce_range else ORT_INT8
        return cached_file(src.parent, name, lambda tmp: quantize(model_dir, src, tmp / name, reduce_range))
    raise InputError(f"--embed-backend onnx runs fp32 or int8, not --embed-dtype {dtype}")


def quantize(model_dir: str, src: Path, out: Path, reduce_range: bool) -> None:
    """Dynamic int8 quantization of every MatMul with a weight (attention's activation products stay fp32)."""
    import logging

    onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) is for static quantization
    try:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                         op_types_to_quantize=["MatMul"], use_external_data_format=large_model(model_dir))
    finally:
        root.setLevel(level)


class OrtEncoder:
    """An ONNX Runtime session of an encoder graph: ``encoder(input_ids, attention_mask)`` -> hidden states (numpy)."""

    def __init__(self, path: str | Path, threads: int):
        ort = onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Every length-cut batch is a new shape: a memory plan per shape would only cost memory.
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask):
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def load_onnx_encoder(model_dir: str, dtype: str, threads: int) -> OrtEncoder:
    return OrtEncoder(ort_graph(model_dir, dtype), threads)
