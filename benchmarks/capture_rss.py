"""Capture's RSS against the tokens: the early-exit forward's resident memory, batch by batch.

Each mode runs in a fresh process on the default config's model, layers and batches (16 x 128 tokens of
the default corpus, in the dtype capture resolves), and prints the RSS every `--every` batches with the
mean tokens/s so far: `default` is glibc's own malloc thresholds, `kept` is `posae.memory.keep_freed_memory`,
which capture() sets. A leak grows with the batches; an allocator settling grows, then stays flat.
`capture` runs posae's whole capture() (the forward and the store writers, training split then validation)
on `--sequences` sequences a split, and prints the RSS after every `--every` batches split into anonymous
memory (the heap: the forward, the writers' buffers) and file-backed pages (mapped files).

    .venv/bin/python benchmarks/capture_rss.py                    # 200 batches (409,600 tokens) a mode; ~20 min in fp32 here
    .venv/bin/python benchmarks/capture_rss.py --batches 60 --modes kept
    .venv/bin/python benchmarks/capture_rss.py --modes capture --sequences 2000 --every 25   # ~11 min in fp32 here
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, sys, time
import numpy as np, torch
from posae import memory
from posae.checks import load_config
from posae.data import capture as cap, corpus, models

mode, n, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "kept":
    memory.keep_freed_memory()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
cfg = load_config("default")
loaded = models.load_model(cfg.model)
seqs = corpus.load_sequences(cfg.corpus, loaded.tokenizer, path=cfg.source).train_SL
B, L = cfg.capture.batch_size, seqs.shape[1]
rows = [(0, rss(), 0.0)]
with torch.inference_mode(), cap.layer_outputs(loaded.model, cfg.capture.layers) as acts:
    t0 = time.perf_counter()
    for b in range(n):
        i = (b * B) % (len(seqs) - B)
        cap.run_to(loaded.model, torch.from_numpy(np.ascontiguousarray(seqs[i:i + B])).long())
        for layer in cfg.capture.layers:
            acts[layer].float().cpu()  # what capture hands its store writers
        acts.clear()
        if (b + 1) % every == 0:
            rows.append(((b + 1) * B * L, rss(), (b + 1) * B * L / (time.perf_counter() - t0)))
print(json.dumps({"dtype": str(loaded.dtype), "rows": rows}))
"""

_CAPTURE_CHILD = """
import dataclasses, json, os, sys, time
from posae.checks import load_config
from posae.data import store
from posae.data.capture import capture

n, every = int(sys.argv[1]), int(sys.argv[2])
def rss():  # total, anonymous, file-backed (bytes)
    f = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile"))}
    return f["VmRSS"], f["RssAnon"], f["RssFile"]
base = load_config("default")
cfg = dataclasses.replace(base, name=f"rss-{n}", corpus=dataclasses.replace(base.corpus, n_train=n, n_val=n))
first_layer, rows, batches, t0, mapped = min(cfg.capture.layers), [], [0], [None], [0]
def mapped_weights():  # the model's weights are memory-mapped from its safetensors cache: the file-backed part's bound
    spans = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(".safetensors")]
    return sum(int(b, 16) - int(a, 16) for a, b in spans)
append = store.StoreWriter.append
def counted(self, *a):  # after every batch's first layer: the split, its tokens so far, RSS
    append(self, *a)
    if self.meta["layer"] == first_layer:
        t0[0] = t0[0] or time.perf_counter()
        batches[0] += 1
        if batches[0] % every == 0 or self._n == self.n_tokens:
            rows.append((self.meta["split"], self._n, self.n_tokens, *rss(), time.perf_counter() - t0[0]))
            mapped[0] = max(mapped[0], mapped_weights())
store.StoreWriter.append = counted
capture(cfg, progress=False)
print(json.dumps({"rows": rows, "mapped": mapped[0]}))
"""


def capture_mode(sequences: int, every: int) -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="posae-rss-") as runs:
        out = subprocess.run([sys.executable, "-c", _CAPTURE_CHILD, str(sequences), str(every)], check=True,
                             capture_output=True, text=True, env={**os.environ, "POSAE_RUNS": runs}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    rows = result["rows"]
    G = 2**30
    print(f"capture() of {sequences} + {sequences} sequences: RSS in GiB after the tokens of each split "
          f"(every {every} batches), with its anonymous and file-backed parts\n")
    print("| split | tokens | RSS | anonymous | file-backed | s since the first batch |\n|---|---:|---:|---:|---:|---:|")
    for split, n, total, rss, anon, file, t in rows:
        print(f"| {split} | {n:,} of {total:,} | {rss / G:.3f} | {anon / G:.3f} | {file / G:.3f} | {t:.0f} |")
    for split in ("train", "val"):
        mine = [r for r in rows if r[0] == split]
        mid = next(r for r in mine if r[1] >= r[2] // 2)
        print(f"\n{split}: RSS from half of the split to its end {mid[3] / G:.3f} -> {mine[-1][3] / G:.3f} GiB "
              f"({mine[-1][3] / mid[3]:.3f}x; anonymous {mid[4] / G:.3f} -> {mine[-1][4] / G:.3f}, "
              f"file-backed {mid[5] / G:.3f} -> {mine[-1][5] / G:.3f})")
    print(f"\nthe model's memory-mapped safetensors: {result['mapped'] / G:.3f} GiB, the most the file-backed part can "
          f"reach (clean pages: the kernel drops them under memory pressure and reads them again when needed)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["default", "kept"], choices=["default", "kept", "capture"])
    ap.add_argument("--sequences", type=int, default=2000, help="capture mode: sequences a split")
    args = ap.parse_args()
    from posae import provenance

    print(f"CPU {provenance.cpu_model()}, bf16 units: {' '.join(provenance.cpu_bf16_features()) or 'none'}")
    if "capture" in args.modes:
        capture_mode(args.sequences, args.every)
        args.modes = [m for m in args.modes if m != "capture"]
        if not args.modes:
            return 0
    runs = {}
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(args.batches), str(args.every)],
                             check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"forward in {next(iter(runs.values()))['dtype']}; RSS in GiB after the tokens (mean tokens/s so far)\n")
    print("| tokens | " + " | ".join(args.modes) + " |\n|---:|" + "---:|" * len(args.modes))
    for i, row in enumerate(runs[args.modes[0]]["rows"]):
        cells = [f"{runs[m]['rows'][i][1] / 2**30:.3f}" + (f" ({runs[m]['rows'][i][2]:,.0f})" if i else " (loaded)")
                 for m in args.modes]
        print(f"| {row[0]:,} | " + " | ".join(cells) + " |")
    for mode in args.modes:
        rows = runs[mode]["rows"]
        half = rows[len(rows) // 2][1]
        print(f"\n{mode}: RSS over the second half of the tokens {half / 2**30:.3f} -> {rows[-1][1] / 2**30:.3f} GiB "
              f"({rows[-1][1] / half:.3f}x); max {max(r[1] for r in rows) / 2**30:.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
