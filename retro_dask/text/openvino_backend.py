"""OpenVINO as the embedder's forward pass (``--embed-backend openvino``), fp32, bf16 or int8.

Reads the checked fp32 graph that ``graph_export`` exports and caches. fp32 runs
it with OpenVINO's inference precision pinned to f32 (on a CPU with AVX-512 BF16
or AMX OpenVINO would otherwise compute in bf16 unasked); bf16 asks for bf16.
int8 runs ``model.ov-int8-gptq.onnx``, written beside the export once per
fingerprint by ``int8_graph`` (smoothed, GPTQ-rounded uint8 weights), with
OpenVINO's dynamic quantization of the activations in groups of ``INT8_GROUP``,
which keeps more of the fp32 model's accuracy than one scale per batch.
Threads are not pinned to cores: each single-thread Dask worker of a machine
would otherwise be pinned to the same one. The kernel cache per input shape is
capped (``RUNTIME_CACHE``): every length-cut batch is a new shape.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .graph_export import cached_file, exported_graph, require

OV_INT8 = "model.ov-int8-gptq.onnx"
# 16 rather than OpenVINO's 32: half the activation rounding error, 1.15x rather than 1.3x fp32's speed (note 32).
INT8_GROUP = 16
# OpenVINO keeps compiled kernels per input shape (5,000 by default): every length-cut batch is a new
# shape, and a worker grew ~1 MB a shape; 16 kept it flat at the same speed (as MODEL_ENV does for oneDNN).
RUNTIME_CACHE = 16


def openvino():
    return require("openvino", "openvino")


def ov_graph(model_dir: str, dtype: str) -> Path:
    src = exported_graph(model_dir)
    if dtype in ("fp32", "bf16"):
        return src
    if dtype == "int8":
        from .int8_graph import write_int8_graph

        return cached_file(src.parent, OV_INT8, lambda tmp: write_int8_graph(model_dir, src, tmp / OV_INT8))
    raise InputError(f"--embed-backend openvino runs fp32, bf16 or int8, not --embed-dtype {dtype}")


class OpenVinoEncoder:
    """A compiled OpenVINO model of an encoder graph: ``encoder(input_ids, attention_mask)`` -> hidden states (numpy)."""

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

    def __call__(self, input_ids, attention_mask):
        # A copy: the request reuses its output buffer on the next call.
        return self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})[self.output].copy()


def load_openvino_encoder(model_dir: str, dtype: str, threads: int) -> OpenVinoEncoder:
    return OpenVinoEncoder(ov_graph(model_dir, dtype), dtype, threads)
