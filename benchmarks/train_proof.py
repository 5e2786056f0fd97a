#!/usr/bin/env python
"""Benchmark: does retrieval lower a small RETRO's validation loss? Retrieval against a random-neighbour control.

In one run:

1. builds the sample corpus's workdir, as a user would
   (``scripts/preprocess.py --sample-corpus`` then ``scripts/build.py --tasks
   build --seq-length SEQ``, default model and index), unless ``--workdir``
   names one already built;
2. for each seed, runs ``scripts/train_retro.py`` on it: the same RETRO
   (retro-pytorch), seed, steps and sample order, once with the workdir's
   neighbours and once with every neighbour replaced by a random database
   chunk and its continuation (the control), both evaluated on every valid
   sample;
3. prints per seed and run the validation loss, per-token perplexity,
   training tokens/s and wall time; then the mean over the seeds, their
   spread (max - min) and whether the goal holds: the control's mean
   validation loss above retrieval's by more than the larger spread, and
   retrieval below the control at every seed.

Seed 0 (``--oracle-seeds``) also trains the oracle run of train_retro.py (the
sample's own next chunk as a neighbour): the diagnostic that tells the
plumbing from what the neighbours hold.

``--record`` appends the table to benchmarks/RESULTS.md; ``--out FILE``
writes the same section to FILE. Sized to finish in under 30 minutes on 2
CPU cores, the build included (about 5 minutes of it): 7 runs of 64 steps
of 8 x 512 tokens, ~1,200 training tokens/s each.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_proof.py [--record]``
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, record_results, table

# The training recipe: small enough that 3 seeds x 2 runs fit the budget on 2 cores.
TRAIN_FLAGS = ["--steps", "64", "--batch-size", "8", "--lr", "2e-3", "--warmup", "8", "--dim", "128",
               "--enc-depth", "1", "--dec-depth", "4", "--cross-attn-layers", "2,4", "--dim-head", "32",
               "--num-neighbors", "2", "--dtype", "bf16", "--num-workers", "2", "--eval-every", "16",
               "--curve-samples", "16"]


def build_workdir(folder: Path, seq_length: int) -> tuple[Path, float, list[str]]:
    """The sample corpus's workdir, built with the project's own commands; (workdir, seconds, commands)."""
    prefix = folder / "data" / "wiki_text_document"
    workdir = folder / "workdir"
    cmds = [[sys.executable, str(ROOT / "scripts" / "preprocess.py"), "--sample-corpus", "--output-prefix",
             str(prefix), "--no-progress"],
            [sys.executable, str(ROOT / "scripts" / "build.py"), "--workdir", str(workdir), "--tasks", "build",
             "--data-path", "1", str(prefix), "--seq-length", str(seq_length), "--dashboard-address", "127.0.0.1:0",
             "--no-progress"]]
    t0 = time.perf_counter()
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    shown = ["python scripts/preprocess.py --sample-corpus --output-prefix DATA/wiki_text_document",
             f"python scripts/build.py --workdir W --tasks build --data-path 1 DATA/wiki_text_document "
             f"--seq-length {seq_length}"]
    return workdir, time.perf_counter() - t0, shown


def train_seed(workdir: Path, seed: int, out: Path, extra: list[str], oracle: bool) -> dict:
    runs = "retrieval,control,oracle" if oracle else "retrieval,control"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_retro.py"), "--workdir", str(workdir), "--seed", str(seed),
           *TRAIN_FLAGS, *extra, "--runs", runs, "--json-out", str(out)]
    # Transparent huge pages for glibc's large blocks: the logits are hundreds of MB a step.
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode:
        raise SystemExit(f"seed {seed}: train_retro.py failed ({proc.returncode})")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def load_train_retro():
    spec = importlib.util.spec_from_file_location("train_retro", ROOT / "scripts" / "train_retro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bigrams(tokens: np.ndarray) -> set:
    return set(zip(tokens[:-1].tolist(), tokens[1:].tolist()))


def neighbour_signal(workdir: Path, k: int, split: str = "valid", limit: int = 200) -> dict[str, float]:
    """What the neighbours hold for the model, before any training.

    - ``next_bigrams_*``: share of the bigrams of chunk c+1 (the tokens that
      chunk c's neighbours help predict) found in those neighbours and their
      continuations: the workdir's neighbours, then the control's random ones;
    - ``align_*``: share of chunk c+o's distinct tokens found in chunk c's
      neighbour chunks, for o = -1, 0, +1: highest at 0 if the neighbours of
      ``neighbor_chunks[c]`` were retrieved for chunk c of the sample.
    """
    from retro_dask import RetroDataset

    tr = load_train_retro()
    ds = RetroDataset(workdir, split, num_neighbors=k, num_retrieved_chunks=2)
    chunks = tr.DatabaseChunks(workdir)
    control = tr.RandomNeighbours(ds, chunks, seed=0, stream=1, pad=-1)
    cl = ds.chunk_length
    found = {"retrieval": [0, 0], "control": [0, 0]}
    align = {o: [0, 0] for o in (-1, 0, 1)}
    for i in range(min(len(ds), limit)):
        for name, item in (("retrieval", ds[i]), ("control", control[i])):
            text, rows = item["text"].numpy(), item["neighbor_chunks"].numpy()
            lengths = chunks.lengths(rows)
            toks = item["neighbor_tokens"].numpy().reshape(rows.shape + (cl,))
            n_chunks = rows.shape[0]
            for c in range(n_chunks):
                spans = [toks[c, j, r, : lengths[c, j, r]] for j in range(rows.shape[1]) for r in range(rows.shape[2])]
                held = set().union(*(bigrams(t) for t in spans))
                if c + 1 < n_chunks:
                    target = bigrams(text[(c + 1) * cl : (c + 2) * cl + 1])
                    found[name][0] += len(target & held)
                    found[name][1] += len(target)
                if name == "retrieval":
                    first = set(np.concatenate([toks[c, j, 0, : lengths[c, j, 0]] for j in range(rows.shape[1])]).tolist())
                    for o in align:
                        if 0 <= c + o < n_chunks:
                            own = set(text[(c + o) * cl : (c + o + 1) * cl].tolist())
                            align[o][0] += len(own & first)
                            align[o][1] += len(own)
    out = {f"next_bigrams_{n}": a / max(b, 1) for n, (a, b) in found.items()}
    out.update({f"align_{o:+d}": a / max(b, 1) for o, (a, b) in align.items()})
    out["samples"] = min(len(ds), limit)
    return out


def curve_table(results: list[dict], final_gap: float) -> str:
    """control - retrieval validation loss at each evaluated step, per seed and on average."""
    points = [dict(res["runs"]["control"]["curve"]) for res in results]
    points_r = [dict(res["runs"]["retrieval"]["curve"]) for res in results]
    steps = sorted(set.intersection(*(set(p) for p in points + points_r))) if points else []
    rows = []
    for s in steps:
        gaps = [c[s] - r[s] for c, r in zip(points, points_r)]
        rows.append([str(s), f"{np.mean([r[s] for r in points_r]):.4f}", f"{np.mean([c[s] for c in points]):.4f}",
                     " / ".join(f"{g:+.4f}" for g in gaps), f"{np.mean(gaps):+.4f}"])
    if not rows:
        return ""
    rows.append([f"{results[0]['runs']['retrieval']['steps']} (all valid)", "", "", "", f"{final_gap:+.4f}"])
    return table(rows, ["step", "retrieval valid loss", "control valid loss", "control - retrieval per seed", "mean"])


def summarize(results: list[dict]) -> tuple[str, bool]:
    rows = []
    for res in results:
        ret, ctl = res["runs"]["retrieval"], res["runs"]["control"]
        for run in (ret, ctl, *([res["runs"]["oracle"]] if "oracle" in res["runs"] else [])):
            rows.append([str(run["seed"]), run["run"], f"{run['valid_loss']:.4f}", f"{run['valid_ppl']:.1f}",
                         f"{run['final_train_loss']:.3f}", f"{run['tokens_per_s']:,.0f}", f"{run['wall_s']:.0f}",
                         f"{ctl['valid_loss'] - ret['valid_loss']:+.4f}" if run is ret else ""])
    loss = {r: np.array([res["runs"][r]["valid_loss"] for res in results]) for r in ("retrieval", "control")}
    gap = loss["control"] - loss["retrieval"]
    spread = {r: float(v.max() - v.min()) for r, v in loss.items()}
    for r in ("retrieval", "control"):
        runs = [res["runs"][r] for res in results]
        rows.append([f"mean of {len(results)}", r, f"{loss[r].mean():.4f}", f"{np.exp(loss[r].mean()):.1f}",
                     f"{np.mean([x['final_train_loss'] for x in runs]):.3f}",
                     f"{np.mean([x['tokens_per_s'] for x in runs]):,.0f}", f"{np.mean([x['wall_s'] for x in runs]):.0f}",
                     f"{gap.mean():+.4f}" if r == "retrieval" else ""])
        rows.append(["spread (max - min)", r, f"{spread[r]:.4f}", "", "", "", "", ""])
    text = table(rows, ["seed", "neighbours", "valid loss", "valid ppl", "train loss (last 10)", "train tokens/s",
                        "wall s", "control - retrieval"])
    curve = curve_table(results, float(gap.mean()))
    if curve:
        text += ("\n\nDuring training (the first --curve-samples valid samples; the last row is the final evaluation "
                 "on all):\n\n" + curve)
    met = bool(gap.mean() > max(spread.values()) and (gap > 0).all())
    verdict = (f"goal {'met' if met else 'NOT met'}: control - retrieval = {gap.mean():+.4f} nats/token on average "
               f"(per seed {', '.join(f'{g:+.4f}' for g in gap)}); spread over the seeds: retrieval "
               f"{spread['retrieval']:.4f}, control {spread['control']:.4f}")
    oracle = [res["runs"]["oracle"]["valid_loss"] - res["runs"]["control"]["valid_loss"] for res in results
              if "oracle" in res["runs"]]
    if oracle:
        verdict += ("\n\nThe oracle (chunk c's first neighbour is the sample's own chunks c and c+1, through the same "
                    "masks and alignment): control - oracle = "
                    + ", ".join(f"{-g:+.4f}" for g in oracle) + " nats/token")
    return text + "\n\n" + verdict, met


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--workdir", type=Path, help="a built workdir to reuse (default: build the sample corpus's)")
    p.add_argument("--seq-length", type=int, default=512, help="sample length of the workdir this script builds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--oracle-seeds", default="0", help="seeds that also train the oracle run (a diagnostic)")
    p.add_argument("--train-args", default="", help="extra flags for train_retro.py, e.g. '--steps 300'")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--out", type=Path, help="also write the section to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (the built workdir)")
    args = p.parse_args()
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="retro-train-proof-"))
    try:
        workdir = args.workdir
        if workdir is not None:
            config = json.loads((Path(workdir) / "config.json").read_text())
            build_note = (f"reused workdir {workdir} (corpus {', '.join(config['chunk']['data']['prefixes'])}, "
                          f"seq_length {config['query']['seq_length']}, split {config['chunk']['split']}, "
                          f"BERT {config['embed']['bert_model'] or 'default'})")
        if workdir is None:
            workdir, build_s, cmds = build_workdir(tmp, args.seq_length)
            build_note = f"workdir built in {build_s:.0f} s with `{cmds[0]}` and `{cmds[1]}`"
            print(build_note, flush=True)
        meta = json.loads((Path(workdir) / "query" / "train" / "meta.json").read_text())
        extra = args.train_args.split()
        k = int(extra[extra.index("--num-neighbors") + 1]) if "--num-neighbors" in extra else int(
            TRAIN_FLAGS[TRAIN_FLAGS.index("--num-neighbors") + 1])
        signal = neighbour_signal(Path(workdir), k)
        print(f"neighbour signal: {json.dumps(signal)}", flush=True)
        oracle_seeds = {int(x) for x in args.oracle_seeds.split(",") if x.strip()}
        results = [train_seed(workdir, int(s), tmp / f"seed{s}.json", extra, int(s) in oracle_seeds)
                   for s in args.seeds.split(",")]
        text, met = summarize(results)
        first = results[0]["runs"]["retrieval"]
        notes = [
            build_note,
            f"model: retro-pytorch {results[0]['retro_pytorch']} RETRO, {first['parameters'] / 1e6:.1f}M parameters "
            f"(GPT-2 vocabulary + 1 pad id); train_retro.py flags: `{' '.join(TRAIN_FLAGS + extra)}`",
            f"data: {first['steps']} steps x {results[0]['args']['batch_size']} samples of {meta['seq_length']} tokens "
            f"({first['train_tokens']:,} training tokens, {first['epochs']} epoch(s) started, of "
            f"{meta['n_samples']:,} train samples); valid: every one of {first['valid_samples']} samples "
            f"({first['valid_tokens']:,} tokens), fp32",
            f"what the neighbours hold ({signal['samples']} valid samples, before training): "
            f"{signal['next_bigrams_retrieval']:.1%} of the bigrams of chunk c+1 are in chunk c's {k} neighbours "
            f"and continuations, against {signal['next_bigrams_control']:.1%} in the control's random chunks; "
            f"chunk c's neighbours hold {signal['align_+0']:.1%} of chunk c's distinct tokens against "
            f"{signal['align_-1']:.1%} of chunk c-1's and {signal['align_+1']:.1%} of chunk c+1's (the neighbours "
            "are aligned with their chunk)",
            f"total wall time of this benchmark: {(time.perf_counter() - t_start) / 60:.1f} min; load average "
            f"(1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores "
            "(other processes on the machine slow every figure of time)",
        ]
        body = text + "\n\n" + "\n".join(f"- {n}" for n in notes)
        command = "python benchmarks/train_proof.py" + (f" --train-args '{args.train_args}'" if args.train_args else "")
        print(f"\nRETRO training proof, {machine()}\n\n{body}")
        title = "train proof: retrieval vs random neighbours"
        if args.out:
            today = datetime.date.today().isoformat()
            args.out.write_text(f"## {title} ({today})\n\nMachine: {machine()}. Command: `{command}`\n\n{body}\n")
        if args.record:
            record_results(title, body, command + " --record")
        if not met:
            sys.exit(1)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
