"""Capture's RSS against the tokens: the early-exit forward's resident memory, batch by batch.

Each mode runs in a fresh process on the default config's model, layers and batches (16 x 128 tokens of
the default corpus, in the dtype capture resolves), and prints the RSS every `--every` batches with the
mean tokens/s so far: `default` is glibc's own malloc thresholds, `kept` is `posae.memory.keep_freed_memory`,
which capture() sets. A leak grows with the batches; an allocator settling grows, then stays flat.

    .venv/bin/python benchmarks/capture_rss.py                    # 200 batches (409,600 tokens) a mode; ~20 min in fp32 here
    .venv/bin/python benchmarks/capture_rss.py --batches 60 --modes kept
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["default", "kept"], choices=["default", "kept"])
    args = ap.parse_args()
    from posae import provenance

    print(f"CPU {provenance.cpu_model()}, bf16 units: {' '.join(provenance.cpu_bf16_features()) or 'none'}")
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
