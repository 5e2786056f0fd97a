"""BERT's encoder forward pass on plain torch, for the embed stage.

A BERT encoder is a few matmuls, layer norms and attention: this module runs it
from the checkpoint's ``config.json`` and safetensors weights without importing
``transformers``, whose import costs each worker seconds and ~150 MB for
features inference does not use (RESULTS.md, profiling note 19). The
computation is transformers' ``BertModel`` (absolute position embeddings,
post-layer-norm, scaled dot-product attention with padded keys masked), with
Q, K and V in one matmul; tests hold it to BertModel's hidden states. A checkpoint this module does not cover (another activation, a decoder,
missing weights) is run by transformers' ``BertModel`` instead
(``load_bert_encoder``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

# transformers' names for the activations of BERT configs.
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_new", "gelu_pytorch_tanh")


def activation(name: str) -> Callable:
    """The torch function for one of ``ACTIVATIONS`` (gelu_new is the tanh approximation, as in transformers)."""
    from functools import partial

    from torch.nn import functional as F

    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return partial(F.gelu, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}[name]


def unsupported(config: dict[str, Any]) -> str | None:
    """Why this module cannot run a checkpoint with this config.json, or None if it can."""
    if config.get("model_type") != "bert":
        return f"model_type {config.get('model_type')!r}"
    if config.get("is_decoder"):
        return "a decoder (is_decoder)"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.get('position_embedding_type')!r}"
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        return f"hidden_act {act!r}"
    if config["hidden_size"] % config["num_attention_heads"]:
        return "hidden_size not a multiple of num_attention_heads"
    return None


def read_weights(model_dir: Path) -> dict[str, Any]:
    """Every tensor of the directory's safetensors files, names without a leading ``bert.``."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, tensor in load_file(str(f)).items():
            weights[name.removeprefix("bert.")] = tensor
    return weights


class BertEncoder:
    """``encoder(input_ids, attention_mask)`` -> the last hidden states ``[batch, length, hidden]``."""

    def __init__(self, config: dict[str, Any], weights: dict[str, Any], device, dtype):
        import torch

        self.hidden_size = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.act = activation(config.get("hidden_act", "gelu"))

        def take(name):
            return weights.pop(name).to(device=device, dtype=dtype).contiguous()

        self.word = take("embeddings.word_embeddings.weight")
        self.position = take("embeddings.position_embeddings.weight")
        # Token type 0 for every token, as BertModel without token_type_ids.
        self.token_type0 = take("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (take("embeddings.LayerNorm.weight"), take("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv_w = torch.cat([take(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")])
            qkv_b = torch.cat([take(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append((
                qkv_w, qkv_b,
                take(p + "attention.output.dense.weight"), take(p + "attention.output.dense.bias"),
                take(p + "attention.output.LayerNorm.weight"), take(p + "attention.output.LayerNorm.bias"),
                take(p + "intermediate.dense.weight"), take(p + "intermediate.dense.bias"),
                take(p + "output.dense.weight"), take(p + "output.dense.bias"),
                take(p + "output.LayerNorm.weight"), take(p + "output.LayerNorm.bias"),
            ))

    def __call__(self, input_ids, attention_mask, always_mask: bool = False):
        """``always_mask``: apply the mask even to a batch without padding (for export: a traced
        ``attention_mask.all()`` would bake one branch into the graph)."""
        from torch.nn import functional as F

        batch, length = input_ids.shape
        hidden, heads, eps = self.hidden_size, self.heads, self.eps
        x = (self.word[input_ids] + self.token_type0) + self.position[:length]  # BertModel's order of sums
        x = F.layer_norm(x, (hidden,), *self.embed_norm, eps)
        # Padded keys get no attention; a batch without padding needs no mask.
        mask = attention_mask.bool()[:, None, None, :] if always_mask or not bool(attention_mask.all()) else None
        for qkv_w, qkv_b, o_w, o_b, n1_w, n1_b, i_w, i_b, f_w, f_b, n2_w, n2_b in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ctx = ctx.transpose(1, 2).reshape(batch, length, hidden)
            x = F.layer_norm(F.linear(ctx, o_w, o_b) + x, (hidden,), n1_w, n1_b, eps)
            x = F.layer_norm(F.linear(self.act(F.linear(x, i_w, i_b)), f_w, f_b) + x, (hidden,), n2_w, n2_b, eps)
        return x

    @classmethod
    def load(cls, model_dir: str, device, dtype) -> "BertEncoder | str":
        """The encoder of this checkpoint, or why this module does not cover it."""
        path = Path(model_dir)
        config = json.loads((path / "config.json").read_text())
        reason = unsupported(config)
        if reason:
            return reason
        try:
            return cls(config, read_weights(path), device, dtype)
        except KeyError as missing:  # other weight names (an old checkpoint's gamma/beta...): transformers knows them
            return f"no weight named {missing.args[0]!r}"


def transformers_encoder(model_dir: str, device, dtype) -> Callable:
    """transformers' BertModel as an encoder, for checkpoints ``BertEncoder`` does not cover."""
    import transformers
    from transformers import BertModel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = BertModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, add_pooling_layer=False,
                                      attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype).eval()

    def encode(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return encode


def export_module(model_dir: str):
    """The fp32 encoder as a ``torch.nn.Module`` ``(input_ids, attention_mask) -> last hidden states``, for
    ``torch.onnx.export``: ``BertEncoder`` with the mask always applied, else transformers' BertModel."""
    import torch

    encoder = BertEncoder.load(model_dir, "cpu", torch.float32)
    if isinstance(encoder, BertEncoder):
        class Encoder(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                return encoder(input_ids, attention_mask, always_mask=True)

        return Encoder().eval()
    import transformers
    from transformers import BertModel

    transformers.utils.logging.set_verbosity_error()
    # Eager attention: its additive mask is plain tensor arithmetic, which every exporter follows.
    model = BertModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, add_pooling_layer=False,
                                      attn_implementation="eager").eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Wrapped().eval()


def load_bert_encoder(model_dir: str, device, dtype) -> Callable:
    """The fastest encoder that runs this checkpoint exactly: ``BertEncoder``, else transformers' BertModel."""
    encoder = BertEncoder.load(model_dir, device, dtype)
    if isinstance(encoder, BertEncoder):
        return encoder
    logging.getLogger(__name__).warning(
        "%s: %s; running it with transformers' BertModel (slower to load, more memory per worker)", model_dir, encoder)
    return transformers_encoder(model_dir, device, dtype)
