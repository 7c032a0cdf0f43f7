"""What a run of a config would do, without doing it: ``python -m posae plan --config paper``.

`make_plan` returns a `Plan` (a frozen dataclass of figures) and `format_plan` prints it. Nothing
is downloaded and no weights are read. (`posae.pipeline.stages.stage_list` is the driver's list of stages;
this module uses it for that list.) Where each figure comes from:

- **Tokens.** Every sequence has ``corpus.seq_len`` tokens, BOS first (`posae.data.corpus`). The forward
  pass runs all of them; a store keeps ``seq_len − 1`` per sequence when ``corpus.exclude_bos``
  (`posae.data.capture._capture_split`), else ``seq_len``.
- **Store size.** `posae.data.store`'s layout, byte for byte: per (layer, split), ``acts.npy`` [N, d] of
  16-bit values, ``tokens.npy``, ``pos.npy`` and ``seq.npy`` [N] of int32, ``mean.npy`` [d] of
  float32, each behind its .npy header (measured by writing it, as the store does), and
  ``meta.json`` (estimated: `META_JSON_BYTES`).
- **Model.** Its config (a cached or local ``config.json``; for a hub model not cached here, the
  shapes in `posae.data.models.KNOWN_CONFIGS`, taken from the model's public config.json) is built into a model
  on torch's ``meta`` device, which allocates nothing: parameter counts are exact, and
  `posae.data.capture.params_run` gives the parameters of the blocks the early-exit forward runs.
- **FLOPs.** Capture: 2 × params_run × forward tokens (the blocks' matmuls; attention scores add
  4·L·heads·head_dim per token and block, under 1% at L = 128, and are left out). SAE training:
  the matmul FLOPs of one micro-batch's forward and backward through `posae.train.objective`,
  counted by `torch.utils.flop_counter` on fake tensors of the real shapes (nothing is computed).
  For the baseline this is (10·B + 4)·d·k for a micro-batch of B tokens: the encoder and the
  decoder matmuls (2·B·d·k each) forward, the decoder's two gradients and the encoder's weight
  gradient backward (the input needs none), and the one-row b_dec·W_enc term (2·d·k, ×2 with b_dec's
  gradient; W_enc's share is an element-wise rank-1 update, `SAE.pre_acts`). The position-aware variants' routing and embeddings add what they add (≈ +45% for
  attention routing at the paper's 8 heads × 64); element-wise work is not counted.
- **Time.** FLOPs ÷ (the GPU's dense peak × `UTILISATION`), with two floors for the SAE steps,
  which are small (a 256 × 2304 micro-batch is ~20 GFLOP, ~0.2 ms on an A100): the host side of a
  micro-batch (gather from the memory-mapped store and normalise: `HOST_SECONDS_PER_VALUE`,
  measured on this repository's CPU) and the launch cost of ~100 eager kernels
  (`LAUNCH_SECONDS_PER_MICRO_BATCH`, assumed). Capture adds the host side of writing the stores
  at the same rate per stored value.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posae.checks import load_config
from posae.config import Config, ConfigError, to_dict

# meta.json of one store: model, corpus and capture settings, counts, scale, hash (~1-2 KB). The
# only estimated byte count; the .npy files are exact.
META_JSON_BYTES = 2048

UTILISATION = 0.4  # share of the dense peak that the forward's and the SAE's matmuls reach (assumed)
# Host side per value (float) of a micro-batch or of a stored activation, on one CPU core: `store.normalised`
# takes ~8 ms for 4096 x 640 values (benchmarks/README.md), ~3 ns each; capture's store writing cost
# ~3 ns per stored value at the default size (1,758 against 1,775 tokens/s, 3 layers x 640 values per token).
HOST_SECONDS_PER_VALUE = 3e-9
# ~100 eager kernel launches per micro-batch (forward, backward, loss, autocast casts) at ~5 us: assumed.
LAUNCH_SECONDS_PER_MICRO_BATCH = 0.5e-3
# Probes fit on the CPU (scikit-learn): the default run's probe stage took 117 s for 60 runs at k = 640
# with 8,000 probe tokens (README); we scale that by runs, k and tokens.
PROBE_SECONDS_REFERENCE = (117.0, 60, 640, 8000)


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense (no sparsity) 16-bit tensor-core peak, TFLOP/s: bfloat16, or float16 without it
    fp32_tflops: float  # plain float32 (torch does not use TF32 for matmuls unless asked)
    memory_gib: float
    native_bf16: bool


GPUS: dict[str, GPU] = {
    "A100": GPU("NVIDIA A100 SXM 80 GB", 312.0, 19.5, 80, True),
    "H100": GPU("NVIDIA H100 SXM 80 GB", 989.0, 67.0, 80, True),
    "L4": GPU("NVIDIA L4 24 GB", 121.0, 30.3, 24, True),
    "T4": GPU("NVIDIA T4 16 GB", 65.0, 8.1, 16, False),  # 65 is float16: the T4 has no bfloat16 units
}


class UnknownGPU(ValueError):
    """--gpu names a GPU that is not in `GPUS`."""


@dataclass(frozen=True)
class StoreBytes:
    """Bytes of one store (one layer, one split) on disk."""

    tokens: int
    acts: int  # acts.npy, header included
    index: int  # tokens.npy + pos.npy + seq.npy
    mean: int  # mean.npy
    meta: int  # meta.json (estimated)

    @property
    def npy(self) -> int:
        return self.acts + self.index + self.mean

    @property
    def total(self) -> int:
        return self.npy + self.meta


@dataclass(frozen=True)
class VariantPlan:
    """One variant's SAE runs (its own YAML may change steps, batch or seeds)."""

    variant: str
    runs: int  # layers x seeds
    steps: int
    batch_size: int  # tokens per micro-batch
    grad_accum: int
    params: int  # SAE parameters
    flops_per_micro_batch: int  # matmul FLOPs of one micro-batch, forward and backward (counted)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def micro_batches(self) -> int:
        """Micro-batches over all runs."""
        return self.runs * self.steps * self.grad_accum

    @property
    def flops(self) -> int:
        """Training FLOPs over all runs."""
        return self.micro_batches * self.flops_per_micro_batch


@dataclass(frozen=True)
class Plan:
    config: str
    source: str
    model: str
    architecture_from: str  # where the model's shapes came from
    n_layers: int
    d_model: int
    intermediate: int
    heads: int
    params_total: int
    params_run: int  # parameters of blocks 0..deepest, the matmuls of the early-exit forward
    device: str  # as asked: model.device, or --device (POSAE_DEVICE) over it
    device_from: str  # which of the two
    forward_dtype: str
    train_dtype: str
    stages: tuple[str, ...]
    layers: tuple[int, ...]
    seq_len: int
    n_train: int
    n_val: int
    exclude_bos: bool
    capture_batch: int
    stores: dict[str, StoreBytes]  # per split, the same for every layer
    variants: tuple[VariantPlan, ...]
    train_tokens_per_layer: int
    k: int
    gpu: GPU
    gpu_key: str
    probe_tokens: int

    # ---------------------------------------------------------------- tokens and bytes

    @property
    def forward_tokens(self) -> int:
        """Tokens through the model: every token of every sequence, BOS included."""
        return (self.n_train + self.n_val) * self.seq_len

    @property
    def stored_tokens(self) -> dict[str, int]:
        """Tokens per store (one layer) of each split."""
        return {split: s.tokens for split, s in self.stores.items()}

    @property
    def store_bytes(self) -> int:
        """All stores of all layers."""
        return len(self.layers) * sum(s.total for s in self.stores.values())

    @property
    def runs(self) -> int:
        return sum(v.runs for v in self.variants)

    # ---------------------------------------------------------------- FLOPs and time

    @property
    def capture_flops(self) -> int:
        return 2 * self.params_run * self.forward_tokens

    @property
    def train_flops(self) -> int:
        return sum(v.flops for v in self.variants)

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s the plan assumes on its GPU for `dtype`: the dense peak times `UTILISATION`."""
        if dtype == "bfloat16" and self.gpu.native_bf16:
            return self.gpu.bf16_tflops * 1e12 * UTILISATION
        return self.gpu.fp32_tflops * 1e12 * UTILISATION

    @property
    def capture_seconds(self) -> dict[str, float]:
        stored_values = len(self.layers) * sum(self.stored_tokens.values()) * self.d_model
        return {"forward": self.capture_flops / self.peak_flops(self.forward_dtype),
                "stores": stored_values * HOST_SECONDS_PER_VALUE}

    def variant_seconds(self, v: VariantPlan) -> dict[str, float]:
        """One variant's runs: host side, then the GPU's FLOP time or the launch floor, whichever is longer."""
        gpu = v.flops_per_micro_batch / self.peak_flops(self.train_dtype)
        return {"host": v.micro_batches * v.batch_size * self.d_model * HOST_SECONDS_PER_VALUE,
                "flops": v.micro_batches * gpu,
                "device": v.micro_batches * max(gpu, LAUNCH_SECONDS_PER_MICRO_BATCH)}

    @property
    def train_seconds(self) -> dict[str, float]:
        parts = [self.variant_seconds(v) for v in self.variants]
        return {key: sum(p[key] for p in parts) for key in ("host", "flops", "device")}

    @property
    def probe_seconds(self) -> float:
        seconds, runs, k, tokens = PROBE_SECONDS_REFERENCE
        return seconds * (self.runs / runs) * (self.k / k) * (self.probe_tokens / tokens)

    @property
    def total_seconds(self) -> float:
        t = self.train_seconds
        return sum(self.capture_seconds.values()) + t["host"] + t["device"] + self.probe_seconds

    # ---------------------------------------------------------------- memory

    @property
    def capture_memory(self) -> dict[str, int]:
        """Bytes on the device during capture (see `format_plan` for what each term holds)."""
        b = _dtype_bytes(self.forward_dtype)
        B, L, d = self.capture_batch, self.seq_len, self.d_model
        return {"weights": self.params_total * b,
                "activations": B * L * (4 * d + 3 * self.intermediate) * b + 2 * B * self.heads * L * L * 4,
                "captured": len(self.layers) * B * L * d * b + B * L * d * 4}

    @property
    def train_memory(self) -> dict[str, int]:
        """Bytes on the device while training the largest variant."""
        P = max(v.params for v in self.variants)
        B = max(v.batch_size for v in self.variants)
        casts = 2 * P if self.train_dtype == "bfloat16" else 0
        return {"sae": 16 * P + casts, "batch": 8 * B * (self.d_model + self.k) * 4}


# --------------------------------------------------------------------------- building the plan


def make_plan(config: str | Path | Config, gpu: str = "A100", variants: list[str] | None = None) -> Plan:
    """The plan of a full reproduction of `config` (a name, a path or a Config) on `gpu`; offline."""
    from posae.config import device_override
    from posae.data import corpus, models
    from posae.data.capture import params_run
    from posae.pipeline.stages import stage_list
    from posae.saes import variant_config

    key = gpu.upper()
    if key not in GPUS:
        raise UnknownGPU(f"--gpu {gpu}: not one of {', '.join(GPUS)}. Fix: pick one of them")
    # The machine that plans is not the one that runs: no device or cache checks beyond the model's shapes.
    cfg = config if isinstance(config, Config) else load_config(config, check_model=False)
    model, hf_config, arch_from = meta_model(cfg)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    models.check_fit(cfg, cfg.source, models.info_from_config(hf_config))
    corpus.check(cfg.corpus, cfg.source)
    d = int(text.hidden_size)
    stages = stage_list(cfg, variants)
    names = [s.name.split(":", 1)[1] for s in stages if s.name.startswith("train:")]
    vplans = []
    for name in names:
        vcfg = variant_config(cfg, name)
        params, flops = sae_cost(name, d, vcfg)
        vplans.append(VariantPlan(name, len(cfg.capture.layers) * len(vcfg.train.seeds), vcfg.train.steps,
                                  vcfg.train.batch_size, vcfg.train.grad_accum, params, flops))
    per_seq = cfg.corpus.seq_len - (1 if cfg.corpus.exclude_bos else 0)
    stores = {split: store_bytes(n * per_seq, d) for split, n in (("train", cfg.corpus.n_train),
                                                                  ("val", cfg.corpus.n_val))}
    device_from = "--device (POSAE_DEVICE)" if device_override() is not None else "model.device"
    g = GPUS[key]
    return Plan(
        config=cfg.name, source=cfg.source, model=cfg.model.name, architecture_from=arch_from,
        n_layers=int(text.num_hidden_layers), d_model=d, intermediate=models.mlp_width(text),
        heads=int(getattr(text, "num_attention_heads", 1)),
        params_total=sum(p.numel() for p in model.parameters()),
        params_run=params_run(model, max(cfg.capture.layers)),
        device=cfg.model.device, device_from=device_from,
        forward_dtype=_dtype_on_gpu(cfg.model.dtype, g), train_dtype=_dtype_on_gpu(cfg.train.dtype, g),
        stages=tuple(s.name for s in stages), layers=tuple(cfg.capture.layers), seq_len=cfg.corpus.seq_len,
        n_train=cfg.corpus.n_train, n_val=cfg.corpus.n_val, exclude_bos=cfg.corpus.exclude_bos,
        capture_batch=cfg.capture.batch_size, stores=stores, variants=tuple(vplans),
        train_tokens_per_layer=stores["train"].tokens, k=max(1, round(cfg.sae.expansion * d)),  # as saes.base
        gpu=g, gpu_key=key, probe_tokens=cfg.probe.tokens,
    )


def _dtype_on_gpu(name: str, gpu: GPU) -> str:
    """`auto` as `posae.data.models.resolve_dtype` would resolve it on `gpu`."""
    if name != "auto":
        return name
    return "bfloat16" if gpu.native_bf16 else "float32"


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


# --------------------------------------------------------------------------- the model's shapes


def hf_config(cfg: Config) -> tuple[Any, str]:
    """The model's transformers config without network or weights, and where it came from."""
    from transformers import AutoConfig

    from posae.data import models

    name, mc, source = cfg.model.name, cfg.model, models.resolve_source(cfg.model)
    if source.kind == "random":
        raise ValueError("the random model is built by `meta_model`")
    if source.kind == "gemma3":
        folder = source.location
        if (folder / "config.json").is_file():
            with models.hub_offline():
                return AutoConfig.from_pretrained(folder, local_files_only=True), f"{folder / 'config.json'}"
        return AutoConfig.for_model(**models.KNOWN_CONFIGS[name]), "posae.data.models.KNOWN_CONFIGS (not converted yet)"
    if source.kind == "folder":
        folder = source.location
        with models.hub_offline():
            return (AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=mc.trust_remote_code),
                    str(folder / "config.json"))
    with models.hub_offline():
        try:
            return (AutoConfig.from_pretrained(name, revision=mc.revision, local_files_only=True,
                                               trust_remote_code=mc.trust_remote_code),
                    "the hub config.json cached here")
        except (OSError, ValueError):
            pass
    if name in models.KNOWN_CONFIGS:
        return (AutoConfig.for_model(**models.KNOWN_CONFIGS[name]),
                "posae.data.models.KNOWN_CONFIGS (the public config.json; not cached here)")
    raise ConfigError(f"{cfg.source}: model.name: no offline shapes for {name!r}: its config.json is not cached here "
                      f"and it is not one of {', '.join(k for k in models.KNOWN_CONFIGS if '/' in k)}. Fix: fetch its "
                      f"config once with network access (`hf download {name} config.json`)")


def meta_model(cfg: Config) -> tuple[Any, Any, str]:
    """(model on the meta device, its transformers config, where the shapes came from)."""
    import torch
    from transformers import AutoModelForCausalLM

    from posae.data import models

    if models.resolve_source(cfg.model).kind == "random":
        tokenizer = models.random_tokenizer()
        with torch.device("meta"):
            model = models.random_model(cfg.model.random, len(tokenizer), tokenizer)
        return model, model.config, "model.random (built in code)"
    config, source = hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return model, config, source


# --------------------------------------------------------------------------- the activation store


def npy_bytes(dtype: Any, shape: tuple[int, ...]) -> int:
    """Size of a .npy file holding an array of `dtype` and `shape`: its header (written here, as
    `posae.data.store` and `np.save` write it) plus the data."""
    from numpy.lib.format import dtype_to_descr, write_array_header_1_0

    buf = io.BytesIO()
    write_array_header_1_0(buf, {"descr": dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def store_bytes(tokens: int, d_model: int) -> StoreBytes:
    """One store of `tokens` activations of width `d_model`, as `posae.data.store.StoreWriter` writes it."""
    return StoreBytes(tokens=tokens, acts=npy_bytes(np.uint16, (tokens, d_model)),
                      index=3 * npy_bytes(np.int32, (tokens,)), mean=npy_bytes(np.float32, (d_model,)),
                      meta=META_JSON_BYTES)


# --------------------------------------------------------------------------- SAE cost

_SAE_COST: dict[str, tuple[int, int]] = {}


def sae_cost(variant: str, d_model: int, vcfg: Config) -> tuple[int, int]:
    """(parameters, matmul FLOPs of one training micro-batch forward and backward) of `variant`.

    Counted on fake tensors (no memory, no compute); a variant whose forward needs real values
    (a data-dependent branch or shape) is run once for real on the CPU instead.
    """
    key = json.dumps([variant, d_model, to_dict(vcfg.sae), to_dict(vcfg.train), vcfg.corpus.seq_len], sort_keys=True)
    if key not in _SAE_COST:
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True):
                _SAE_COST[key] = _count(variant, d_model, vcfg)
        except RuntimeError:  # an op fake tensors cannot run (a data-dependent shape or branch): count for real
            _SAE_COST[key] = _count(variant, d_model, vcfg)
    return _SAE_COST[key]


def _count(variant: str, d_model: int, vcfg: Config) -> tuple[int, int]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from posae.saes import build
    from posae.train import objective

    T, B, tcfg = vcfg.corpus.seq_len, vcfg.train.batch_size, vcfg.train
    sae = build(variant, d_model, vcfg.sae, T, seed=0)
    g = torch.Generator().manual_seed(0)
    x_BD = torch.randn(B, d_model, generator=g)
    # Positions as the store holds them: sequences one after another, BOS (position 0) excluded.
    first = 1 if vcfg.corpus.exclude_bos else 0
    pos_B = torch.arange(B) % (T - first) + first
    with FlopCounterMode(display=False) as counter:
        out = sae(x_BD, pos_B)
        terms, _, _ = objective(out, x_BD, pos_B, tcfg, tcfg.steps // 2, T)
        terms["total"].backward()
    return sum(p.numel() for p in sae.parameters()), int(counter.get_total_flops())


# --------------------------------------------------------------------------- printing


def _b(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n):,} B"


def _t(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _n(n: float) -> str:
    """1,234 / 1.23 M / 2.61 B / 4.38 P (FLOPs: 'P' = 10^15, 'E' = 10^18)."""
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n):,}"


def _shown(source: str) -> str:
    """A config path relative to the repository when it is inside it."""
    from posae.paths import REPO_ROOT

    try:
        return str(Path(source).resolve().relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return source


def _flops(n: float) -> str:
    num, _, unit = _n(n).partition(" ")
    names = {"E": "EFLOP", "P": "PFLOP", "T": "TFLOP", "B": "GFLOP", "M": "MFLOP"}
    return f"{num} {names[unit]}" if unit else f"{num} FLOP"


def format_plan(p: Plan) -> str:
    """The plan as the text `python -m posae plan` prints."""
    trains = [s for s in p.stages if s.startswith("train:")]
    others = [s for s in p.stages if not s.startswith("train:")]
    n_before = next((i for i, s in enumerate(p.stages) if s.startswith("train:")), len(others))
    tr, va = p.stores["train"], p.stores["val"]
    per_seq = p.seq_len - (1 if p.exclude_bos else 0)
    cap_t, train_t = p.capture_seconds, p.train_seconds
    cm, tm = p.capture_memory, p.train_memory
    stored_values = len(p.layers) * sum(p.stored_tokens.values()) * p.d_model
    same = len({(v.steps, v.batch_size, v.grad_accum) for v in p.variants}) == 1
    v0 = p.variants[0] if p.variants else None
    rate = "bf16" if p.train_dtype == "bfloat16" and p.gpu.native_bf16 else "fp32"
    ns = f"{HOST_SECONDS_PER_VALUE * 1e9:g} ns"
    half = "bf16" if p.gpu.native_bf16 else "fp16 (no bf16 units: bf16 is taken at the fp32 rate)"
    device = f"{p.device_from} {p.device}" + {
        "auto": ", which picks CUDA on a machine with a GPU", "cuda": ""}.get(
        p.device, ": this run would not use a GPU; the GPU figures are for --device cuda")
    lines = [
        f"plan for {p.config} ({_shown(p.source)}); nothing is downloaded",
        "",
        f"model     {p.model}: {p.n_layers} layers, d = {p.d_model:,}, {_n(p.params_total)} parameters",
        f"          shapes from {p.architecture_from}",
        f"device    {device}",
        f"          on the {p.gpu_key}: forward in {p.forward_dtype}, SAE training with {p.train_dtype} autocast",
        f"stages    {len(p.stages)}: {', '.join(others[:n_before])}, train x {len(trains)} (one per variant), "
        f"{', '.join(others[n_before:])}",
        "",
        f"capture   layers {', '.join(map(str, p.layers))}; {p.n_train:,} train + {p.n_val:,} val sequences of "
        f"{p.seq_len} tokens, batches of {p.capture_batch}",
        f"          forward: {p.forward_tokens:,} tokens (BOS included) through blocks 0..{max(p.layers)}",
        f"          = 2 x {_n(p.params_run)} parameters run x {p.forward_tokens:,} tokens = {_flops(p.capture_flops)}",
        f"          stored per layer: {tr.tokens:,} train + {va.tokens:,} val tokens "
        f"({per_seq} per sequence{', BOS excluded' if p.exclude_bos else ''})",
        f"store     per layer: train {_b(tr.total)}, val {_b(va.total)}; {len(p.layers)} layers: {_b(p.store_bytes)} "
        f"({p.store_bytes:,} bytes)",
        f"          each: acts.npy N x {p.d_model} x 2 bytes + tokens/pos/seq.npy 3 x N x 4 + mean.npy "
        f"{p.d_model} x 4",
        f"          + .npy headers + meta.json (~{META_JSON_BYTES // 1024} KiB, estimated), "
        f"under runs/{p.config}/activations/",
        "",
        f"SAE runs  {len(p.variants)} variants x {len(p.layers)} layers x seeds = {p.runs} runs, "
        f"dictionary k = {p.k:,}",
    ]
    if same and v0 is not None:
        epochs = v0.tokens_per_run / p.train_tokens_per_layer
        lines += [f"          per run: {v0.steps:,} steps x {v0.batch_size:,} tokens x {v0.grad_accum} "
                  f"micro-batch{'es' if v0.grad_accum > 1 else ''} = {v0.tokens_per_run:,} tokens",
                  f"          = {epochs:,.0f} epochs of the {p.train_tokens_per_layer:,} training tokens of a layer"]
    lines.append("          matmul FLOPs per token, forward + backward, counted (baseline: (10 B + 6) d k a micro-batch):")
    width = max(20, *(len(v.variant) for v in p.variants))
    for v in p.variants:
        extra = "" if same else f", {v.steps:,} steps x {v.tokens_per_step:,} tokens"
        lines.append(f"            {v.variant:<{width}} {v.flops_per_micro_batch / v.batch_size / (p.d_model * p.k):5.2f} "
                     f"d k = {_n(v.flops_per_micro_batch / v.batch_size):>8}, {_n(v.params):>8} parameters, "
                     f"{v.runs} runs{extra}")
    lines += [
        f"          all runs: {_flops(p.train_flops)}",
        "",
        f"memory    capture, on the device: {_b(sum(cm.values()))}",
        f"            weights {_b(cm['weights'])} ({_n(p.params_total)} x {_dtype_bytes(p.forward_dtype)} bytes: the "
        "whole model is loaded, early exit or not)",
        f"            + one batch's activations ~{_b(cm['activations'])} (B L (4 d + 3 intermediate), 2 B heads L^2 "
        "fp32 scores)",
        f"            + captured outputs {_b(cm['captured'])} (B L d a captured layer, one fp32 copy for the host)",
        f"          capture, on the host: the weights pass through RAM while loading ({_b(cm['weights'])}); stores "
        "stream to disk",
        f"          training, on the device: {_b(sum(tm.values()))}",
        f"            SAE {_b(tm['sae'])} (largest variant: fp32 weights, gradients, 2 AdamW moments"
        f"{', bf16 casts' if p.train_dtype == 'bfloat16' else ''})",
        f"            + one micro-batch ~{_b(tm['batch'])} (at most 8 B (d + k) fp32 values with the gradients)",
        f"          training, on the host: the store is memory-mapped; {_b(tr.total)} a layer should fit the page cache",
    ]
    if sum(cm.values()) > p.gpu.memory_gib * 2**30:
        lines.append(f"          WARNING: capture needs more than the {p.gpu.memory_gib:g} GiB of an {p.gpu_key}: "
                     "lower capture.batch_size")
    lines += [
        "",
        f"time      on an {p.gpu.name}: dense peak {p.gpu.bf16_tflops:g} TFLOP/s {half}, {p.gpu.fp32_tflops:g} fp32;"
        f" assumed utilisation {UTILISATION:.0%}",
        f"  capture {_t(sum(cap_t.values()))} = forward {_t(cap_t['forward'])} + host {_t(cap_t['stores'])} "
        f"(writing {stored_values:,} values, {ns} each)",
        "          plus downloading the model and streaming the corpus, not estimated",
        f"  SAEs    {_t(train_t['host'] + train_t['device'])} for {p.runs} runs one after another = host "
        f"{_t(train_t['host'])} + device {_t(train_t['device'])}",
        f"          host: gather and normalise each micro-batch, {ns} a value; device: the FLOPs ({_t(train_t['flops'])} "
        f"at {rate} x {UTILISATION:.0%})",
        f"          or {LAUNCH_SECONDS_PER_MICRO_BATCH * 1e3:g} ms of kernel launches per micro-batch (assumed), "
        "whichever is longer",
        f"  probes  ~{_t(p.probe_seconds)} on the CPU (scikit-learn; the default run's {PROBE_SECONDS_REFERENCE[0]:.0f} s "
        f"for {PROBE_SECONDS_REFERENCE[1]} runs at k = {PROBE_SECONDS_REFERENCE[2]}, scaled)",
        f"  total   ~{_t(p.total_seconds)}; structure, ablations and figures add minutes on the CPU",
    ]
    if train_t["host"] + train_t["device"] > 2 * train_t["flops"]:
        lines += ["          the SAE steps are bound by the host and by kernel launches, not by FLOPs: a faster GPU "
                  "barely helps,",
                  "          running trainings side by side (reproduce --jobs N, one CPU core each) does"]
    return "\n".join(lines)
