"""embed: stored embeddings against a straightforward transformers computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from embed_probe import probe_script
from retro_dask.build import run_build
from retro_dask.config import BuildConfig, ChunkConfig, DataBlend, EmbedConfig, QueryConfig, RunOptions


def reference_embeddings(texts, model_dir):
    """Mean of BERT's last hidden states over the WordPiece tokens, [CLS]/[SEP] excluded, one text at a time."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**enc).last_hidden_state[0]
            out.append(hidden[1:-1].mean(dim=0).numpy())
    return np.stack(out)


def build_embeddings(tmp_path, prefix, **embed):
    config = BuildConfig(ChunkConfig(DataBlend((1.0,), (prefix,)), block_size=256),
                         embed=EmbedConfig(**embed),
                         query=QueryConfig(train_samples=0, valid_samples=0, test_samples=0))
    run_build(tmp_path / "w", config, RunOptions(cluster="synchronous", progress=False), "db-build,embed",
              log=lambda m: None)
    return tmp_path / "w"


@pytest.fixture(scope="module")
def sample_embeddings(tmp_path_factory, sample_texts, gpt):
    """The real all-MiniLM-L6-v2 on 150 sample documents (about 350 chunks)."""
    from conftest import write_corpus

    tmp = tmp_path_factory.mktemp("embed")
    prefix = write_corpus(tmp / "wiki150", sample_texts[1000:1150], gpt)
    return build_embeddings(tmp, prefix)


def test_embeddings_match_transformers(sample_embeddings):
    from retro_dask import inspect as retro
    from retro_dask.text.bert import default_bert_dir

    w = sample_embeddings
    retro.init(str(w), quiet=True)
    n = retro.get_db_num_chunks()
    rows = np.random.default_rng(0).choice(n, size=min(200, n), replace=False)
    stored = zarr.open_array(str(w / "db" / "embeddings.zarr"), mode="r")[:][rows]
    expected = reference_embeddings([retro.get_db_chunk_text(int(r)) for r in rows], default_bert_dir())
    cos = (stored * expected).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999, cos.min()


def test_bf16_and_float16_storage(tmp_path, small_corpus_prefix, tiny_bert, sample_embeddings):
    fp32 = zarr.open_array(str(build_embeddings(tmp_path / "a", small_corpus_prefix, bert_model=tiny_bert)
                               / "db" / "embeddings.zarr"), mode="r")[:]
    half = zarr.open_array(str(build_embeddings(tmp_path / "b", small_corpus_prefix, bert_model=tiny_bert,
                                                embed_dtype="bf16", store_dtype="float16")
                               / "db" / "embeddings.zarr"), mode="r")
    assert half.dtype == np.float16
    h = half[:].astype(np.float32)
    cos = (fp32 * h).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(h, axis=1)
    assert cos.min() > 0.99


def test_results_in_row_order_whatever_the_batching():
    """Length-sorted batching must give back rows in input order."""
    from retro_dask.text.embedder import get_embedder

    embedder = get_embedder(EmbedConfig())
    texts = ["a much longer text about the history of the Roman empire and its emperors " * 3, "short", "medium text"]
    together = embedder.embed_texts(texts, batch_size=2)
    alone = np.stack([embedder.embed_texts([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_embed_texts_for_notebooks():
    from retro_dask.text.embedder import embed_texts

    x = embed_texts(["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply."])
    assert x.shape == (3, 384)
    sim = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert sim(x[0], x[1]) > sim(x[0], x[2])


def test_embedded_cluster_starts_workers_with_the_model_environment(tmp_path):
    """The model runs on a Dask task thread; glibc's per-thread arenas slowed it (RESULTS.md note 6).
    Large buffers must not fault in fresh pages on every allocation (note 21)."""
    import os

    from conftest import page_faults_of_large_buffers
    from retro_dask.engine.cluster import open_client
    from retro_dask.config import RunOptions

    options = RunOptions(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0", progress=False)
    with open_client(options, str(tmp_path), log=lambda m: None) as client:
        seen = client.run(lambda: [os.environ.get(k) for k in (
            "MALLOC_ARENA_MAX", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY", "MALLOC_TRIM_THRESHOLD_")])
        cadence = client.run(monitor_cadence)
        scheduler_cadence = client.run_on_scheduler(monitor_cadence)
        faults = client.run(page_faults_of_large_buffers)
    # One malloc arena, small oneDNN and ideep kernel caches (RESULTS.md notes 10, 11, 18), Dask's own settings kept.
    assert list(seen.values()) == [["1", "8", "8", "65536"]]
    # Dask's monitors wake the workers and the scheduler less often (RESULTS.md note 20).
    assert list(cadence.values()) == [[0.5, 0.25, 1.0, 0.05, 5.0]]
    assert scheduler_cadence[0] == 0.5 and scheduler_cadence[2] == 1.0, scheduler_cadence
    # Large temporary buffers reuse heap pages instead of faulting in a fresh mmap each time
    # (RESULTS.md note 21): with Dask's MALLOC_TRIM_THRESHOLD_ alone, 50 buffers of 256 pages
    # fault ~12,800 pages in.
    assert max(faults.values()) < 2_000, faults


def monitor_cadence(dask_worker=None, dask_scheduler=None):
    """The intervals, in seconds, of the periodic callbacks a running worker or scheduler uses."""
    server = dask_worker or dask_scheduler
    names = ("tick", "memory_monitor", "monitor", "profile", "profile-cycle")
    return [server.periodic_callbacks[n].callback_time / 1000 if n in server.periodic_callbacks else None
            for n in names]


KERNEL_CACHE_PROBE = probe_script('embed_dtype="bf16"', r"""
# PyTorch's attention kernels are kept per chunk width (at most --bert-max-chunk-length of them):
# meet every width first. Then each batch is a matmul shape not seen before.
for w in range(40, 121):
    e.embed_ids(batch(w, 8), batch_size=8)
warm = rss_mb()
for rows in (3, 7):
    for w in range(40, 121):
        e.embed_ids(batch(w, rows), batch_size=rows)
print(json.dumps({"warm": warm, "end": rss_mb(),
                  "env": [os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")]}))
""")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_model_memory_does_not_grow_with_new_batch_shapes(tmp_path):
    """Every length-cut batch is a new matmul shape; oneDNN and ideep cache kernels per shape
    (1,024 each by default: bf16 workers grew by ~1 MB a shape). The Embedder caps both caches
    in any process where they are unset (RESULTS.md notes 11, 18)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", KERNEL_CACHE_PROBE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["env"] == ["8", "8"]
    # 162 new shapes after warming up: a few MB of allocator noise, not ~1 MB a shape.
    assert probe["end"] - probe["warm"] < 40, probe


def save_tiny_bert(folder, hidden_act="gelu", with_heads=False):
    """A seeded 2-layer BERT; ``with_heads`` saves BertForMaskedLM (weights named ``bert.*`` and ``cls.*``)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, hidden_act=hidden_act)
    model = BertForMaskedLM(config) if with_heads else BertModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def pad(id_lists):
    """Token ids and attention mask of a right-padded batch."""
    ids = torch.zeros(len(id_lists), max(map(len, id_lists)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(id_lists):
        ids[i, : len(x)], mask[i, : len(x)] = torch.as_tensor(x), 1
    return ids, mask


def padded_batch(lengths, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pad([torch.randint(1, vocab, (n,), generator=gen) for n in lengths])


@pytest.mark.parametrize("hidden_act,with_heads", [("gelu", False), ("gelu", True), ("relu", False),
                                                   ("gelu_new", False), ("silu", False)])
def test_bert_encoder_matches_transformers(tmp_path, hidden_act, with_heads):
    """The embed stage's own BERT forward pass gives BertModel's hidden states on every real token."""
    from transformers import BertModel

    from retro_dask.text.bert_encoder import BertEncoder, load_bert_encoder

    folder = save_tiny_bert(tmp_path / "bert", hidden_act, with_heads)
    reference = BertModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="sdpa").eval()
    encoder = load_bert_encoder(folder, torch.device("cpu"), torch.float32)
    assert isinstance(encoder, BertEncoder)
    for lengths in ([5, 17, 9, 17], [12, 12, 12]):  # with padding, and without (no mask)
        ids, mask = padded_batch(lengths)
        with torch.inference_mode():
            want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            got = encoder(ids, mask)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(got[i, :n], want[i, :n], rtol=1e-5, atol=1e-5)


def test_the_default_model_runs_on_the_own_encoder_exactly(sample_texts):
    """all-MiniLM-L6-v2: the same numbers as BertModel in fp32, and close in bf16."""
    from transformers import BertModel

    from retro_dask.text.bert_encoder import BertEncoder, load_bert_encoder
    from retro_dask.text.bert import default_bert_dir, get_bert_tokenizer

    ids_list = get_bert_tokenizer().encode_for_model([t[:400] for t in sample_texts[:8]], 256)
    lengths = [len(x) for x in ids_list]
    ids, mask = pad(ids_list)
    reference = BertModel.from_pretrained(default_bert_dir(), add_pooling_layer=False, attn_implementation="sdpa").eval()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        encoder = load_bert_encoder(default_bert_dir(), torch.device("cpu"), dtype)
        assert isinstance(encoder, BertEncoder)
        with torch.inference_mode():
            want = reference.to(dtype)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            got = encoder(ids, mask).float()
        for i, n in enumerate(lengths):
            if tol:
                torch.testing.assert_close(got[i, :n], want[i, :n], rtol=tol, atol=tol)
            else:
                assert torch.nn.functional.cosine_similarity(got[i, :n], want[i, :n], dim=-1).min() > 0.99


def test_an_unsupported_checkpoint_runs_on_transformers(tmp_path, caplog):
    """An activation the own encoder does not have: transformers' BertModel runs it, with the same results."""
    from transformers import BertModel

    from retro_dask.text.bert_encoder import BertEncoder, load_bert_encoder

    folder = save_tiny_bert(tmp_path / "bert", hidden_act="quick_gelu")
    with caplog.at_level("WARNING", logger="retro_dask.text.bert_encoder"):
        encoder = load_bert_encoder(folder, torch.device("cpu"), torch.float32)
    assert not isinstance(encoder, BertEncoder)
    assert "hidden_act 'quick_gelu'" in caplog.text
    reference = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    ids, mask = padded_batch([4, 11, 7])
    with torch.inference_mode():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = encoder(ids, mask)
    for i, n in enumerate([4, 11, 7]):
        torch.testing.assert_close(got[i, :n], want[i, :n])


def test_the_embedder_does_not_import_transformers():
    """Importing transformers cost each worker ~2.7 s and ~150 MB (RESULTS.md note 19)."""
    import subprocess
    import sys

    code = ("import sys; from retro_dask.text.embedder import embed_texts; v = embed_texts(['Paris is in France.']); "
            "print(v.shape, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "False", out.stdout


def test_a_checkpoint_with_other_weight_names_runs_on_transformers(tmp_path, caplog):
    """Old checkpoints name layer norms gamma/beta: transformers renames them, the own encoder defers to it."""
    from safetensors.torch import load_file, save_file

    from retro_dask.text.bert_encoder import BertEncoder, load_bert_encoder

    folder = tmp_path / "bert"
    save_tiny_bert(folder)
    weights = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items()}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="retro_dask.text.bert_encoder"):
        encoder = load_bert_encoder(str(folder), torch.device("cpu"), torch.float32)
    assert not isinstance(encoder, BertEncoder)
    assert "no weight named 'embeddings.LayerNorm.weight'" in caplog.text


def test_emulated_half_precision_is_named_when_the_embedder_starts(tiny_bert, caplog):
    """bf16 on an AVX2-only CPU is emulated (~5x slower than fp32 here): the embedder says so."""
    from pathlib import Path

    from retro_dask.text.embedder import Embedder, native_half_precision

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        assert native_half_precision(torch.bfloat16)
    if flags and not any(f.startswith("avx512") for f in flags):  # AVX2 at most: bf16 is emulated
        assert not native_half_precision(torch.bfloat16)
    assert native_half_precision(torch.float32)
    for dtype in ("fp32", "bf16"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="retro_dask.text.embedder"):
            Embedder(EmbedConfig(bert_model=tiny_bert, embed_dtype=dtype), "cpu", threads=1)
        warned = "has no native bf16 matmul" in caplog.text
        assert warned == (dtype == "bf16" and not native_half_precision(torch.bfloat16)), caplog.text
