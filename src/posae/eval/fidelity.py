"""Downstream fidelity: what the model's next-token prediction loses when an SAE's reconstruction replaces a
layer's activation (the CE-loss score and KL of SAELens and SAEBench; notebook 04).

For each run, on `probe.fidelity_sequences` whole validation sequences drawn with `probe.seed`:

    ce_clean    the model's next-token cross-entropy, nats per token
    ce_zero     with the layer's activation set to zero
    ce_spliced  with it replaced by the SAE's reconstruction, back on the raw scale: x = x̂ / scale + μ,
                the inverse of `ActivationStore.normalise` ((x − μ) · scale)
    ce_score    (ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 when splicing loses nothing, 0 when it
                loses as much as deleting the layer's activation
    kl_spliced  KL(clean ‖ spliced) of the next-token distributions, mean per token; kl_zero likewise

pooled (fidelity.csv) and by position bucket of the predicting position (fidelity_by_position.csv;
`posae.saes.buckets.position_bucket`). Position 0 (BOS) keeps its original activation in the spliced and
the zero-ablated passes; every other position 1..L-1 is replaced, the SAE seeing the positions it was
trained with (the store's `pos`, which is the position in the sequence). Losses are those of the predictions
made at positions 1..L-2, of the tokens at 2..L-1: the stored positions that have a next token (position 0's
prediction sees only BOS, which no pass changes).

How it runs. One forward per batch of sequences (the clean pass) records the layer's output and how the model
called every decoder block above it (positional and keyword arguments: attention masks and rotary embeddings,
which in Gemma 3 differ between its local and global blocks), and stops before the unembedding. A spliced or
ablated pass calls only the blocks above the layer, with those same arguments, then the model's final norm and
unembedding (and Gemma 2's final logit soft-capping where the config sets it; Gemma 3 270M has none and ties
the unembedding to the embedding). `model_tail` checks once that this tail reproduces the model's own logits,
and each clean pass that the layer's output is what the validation store holds for those tokens. Forwards run
in the dtype the stores were captured in, losses in float32 over blocks of the vocabulary (`token_losses`), so
the [tokens, vocabulary] logits (262,144 wide in Gemma 3) never exist whole.

Cost, on the default config (60 runs, Gemma 3 270M in bfloat16, this 2-core CPU) with the default 4 sequences
(504 predictions per pass): 62-71 s of CPU. The losses take ~42 s of it (per token and pass on one core, ~0.6 ms
for the unembedding's 640 x 262,144 matmul and ~0.5 ms for the float32 log-sum-exp and KL), the blocks above the
layers ~14 s (a pass from layer 3: 0.27 s, from 8: 0.18 s, from 13: 0.08 s), both shared by two workers; a clean
pass 0.5 s, loading the model 4-8 s. Wall time: 39 s measured with the machine otherwise idle, 55-67 s with other
processes on it; each further sequence adds ~12 s of CPU (~6 s of wall). The memory peak is the model's load
(2.2 GB); the measurement adds under 0.1 GB.

Standard errors of that sample (by sequence, estimated from 32): 0.01-0.03 on a run's CE score and 0.1-0.2 nats
on its KL, the text's variation; 0.002-0.01 on the difference between two runs of one layer, which see the same
tokens (the two seeds of one variant differ by 0.002-0.02).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch

from posae import checkpoint
from posae.config import Config
from posae.data import models
from posae.data.capture import decoder_layers
from posae.data.store import RECAPTURE, ActivationStore, StoreError, open_layer_stores
from posae.eval.metrics import check_normalisation
from posae.memory import keep_freed_memory
from posae.paths import lock_path, locked, run_dir, write_csv_atomic
from posae.progress import bar as progress_bar
from posae.saes import SAE, as_variant_list
from posae.saes.buckets import position_bucket

FIDELITY_CSV, FIDELITY_BY_POSITION_CSV = "fidelity.csv", "fidelity_by_position.csv"
RUN_KEYS = ["variant", "layer", "seed"]
COLUMNS = RUN_KEYS + ["ce_clean", "ce_zero", "ce_spliced", "ce_score", "kl_spliced", "kl_zero", "tokens", "sequences"]
BY_POSITION_COLUMNS = RUN_KEYS + ["bucket", "ce_clean", "ce_zero", "ce_spliced", "ce_score", "kl_spliced", "kl_zero",
                                  "tokens"]
TOKEN_CHUNK, VOCAB_BLOCK = 32, 1024  # losses: 32 tokens x 1,024 logits of every pass at a time (`token_losses`)
# Relative error ‖h − stored‖ / ‖stored‖ of a layer's output against the validation store above which the
# tokens or the model are not those of the capture. A bfloat16 forward of another batch size rounds otherwise:
# 0.3%, 0.4% and 0.6% at layers 3, 8 and 13 of the default config for 4 sequences against capture's 16.
STORE_TOLERANCE = 5e-2
# Largest logit difference, relative to the largest logit, between the model's own logits and the tail's.
TAIL_TOLERANCE = 1e-2

Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (raw x_ND float32, pos_N) -> raw x_ND


# --------------------------------------------------------------------------- the model, from a layer on


class Tail(NamedTuple):
    """What the model applies to a block's output: the blocks above it, then these."""

    blocks: Any  # the nn.ModuleList of decoder blocks (`posae.data.capture.decoder_layers`)
    norm: torch.nn.Module  # the final norm
    head: torch.nn.Linear  # the unembedding (`get_output_embeddings`; Gemma ties it to the embedding)
    softcap: float | None  # final logit soft-capping, logits = c · tanh(logits / c) (Gemma 2: 30; Gemma 3: none)


FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


class _Stop(Exception):
    """Raised before the unembedding: the clean pass has what it needs."""


@torch.inference_mode()
def model_tail(model: Any) -> Tail:
    """The decoder blocks, final norm, unembedding and logit soft-capping of a causal LM, checked.

    The final norm is the one child of the module holding the blocks named as in transformers' models (Gemma,
    Llama: norm; GPT-2: ln_f; GPT-NeoX, OPT: final_layer_norm; Phi: final_layernorm). A forward of 8 tokens
    checks that norm, unembedding and soft-capping applied to the last block's output give the model's logits.
    """
    blocks = decoder_layers(model)
    owner_name = next(name for name, m in model.named_modules() if m is blocks).rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    norms = [getattr(owner, n) for n in FINAL_NORMS if isinstance(getattr(owner, n, None), torch.nn.Module)]
    head = model.get_output_embeddings()
    if len(norms) != 1 or not isinstance(head, torch.nn.Linear):
        raise RuntimeError(f"{type(model).__name__}: expected one final norm among {', '.join(FINAL_NORMS)} of "
                           f"{owner_name or 'the model'} (found {len(norms)}) and a linear unembedding (found "
                           f"{type(head).__name__}): posae cannot run the blocks above a layer of this model alone")
    tail = Tail(blocks, norms[0], head, getattr(model.config.get_text_config(), "final_logit_softcapping", None))
    last: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda module, args, output: last.append(_hidden(output)))
    try:
        ids_1T = (torch.arange(8, device=head.weight.device) % head.out_features).unsqueeze(0)
        theirs_TV = model(input_ids=ids_1T, attention_mask=torch.ones_like(ids_1T), use_cache=False).logits[0].float()
    finally:
        handle.remove()
    gap = float((logits(tail, tail.norm(last[0][0])).float() - theirs_TV).abs().max())
    if not gap <= TAIL_TOLERANCE * max(1.0, float(theirs_TV.abs().max())):
        raise RuntimeError(f"{type(model).__name__}: its final norm and unembedding, applied to the last block's "
                           f"output, give logits {gap:.3g} away from the model's own: posae cannot run the blocks "
                           f"above a layer of this model alone")
    return tail


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def logits(tail: Tail, final_ND: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
    """Next-token logits (of the tokens `vocab`) from the final norm's output, as the model's forward computes
    them, in its dtype."""
    bias = tail.head.bias[vocab] if tail.head.bias is not None else None
    z_NV = torch.nn.functional.linear(final_ND, tail.head.weight[vocab], bias)
    if tail.softcap is not None:
        z_NV = torch.tanh(z_NV / tail.softcap) * tail.softcap
    return z_NV


class BlockCall(NamedTuple):
    """How the model called one decoder block, but for the hidden states (always its first argument)."""

    args: tuple
    kwargs: dict[str, Any]


class CleanPass(NamedTuple):
    hidden: dict[int, torch.Tensor]  # layer -> output of block `layer` [B, L, D], forward dtype
    calls: dict[int, BlockCall]  # block index -> its call, for every block above the lowest layer
    final_BLD: torch.Tensor  # the final norm's output: what the model feeds its unembedding


@torch.inference_mode()
def clean_pass(model: Any, ids_BL: torch.Tensor, layers: Iterable[int], tail: Tail) -> CleanPass:
    """One forward of the unchanged model over `ids_BL` (stopped before the unembedding), recording what
    `run_from` needs for each of `layers`: their outputs and the calls of every block above the lowest."""
    layers = sorted(set(layers))
    blocks = tail.blocks
    hidden: dict[int, torch.Tensor] = {}
    calls: dict[int, BlockCall] = {}
    final: list[torch.Tensor] = []

    def keep_output(layer: int):
        def hook(module, args, output):
            hidden[layer] = _hidden(output)

        return hook

    def keep_call(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            rest = tuple(args[1:]) if args else ()
            if not args:
                kwargs.pop("hidden_states")
            calls[index] = BlockCall(rest, kwargs)

        return hook

    def stop(module, args):
        final.append(args[0])
        raise _Stop

    handles = [blocks[layer].register_forward_hook(keep_output(layer)) for layer in layers]
    handles += [blocks[i].register_forward_pre_hook(keep_call(i), with_kwargs=True)
                for i in range(layers[0] + 1, len(blocks))]
    handles.append(tail.head.register_forward_pre_hook(stop))
    try:
        model(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not final:
        raise RuntimeError(f"{type(model).__name__}: the forward pass never reached the unembedding")
    return CleanPass(hidden, calls, final[0])


@torch.inference_mode()
def run_from(tail: Tail, layer: int, hidden_BLD: torch.Tensor, calls: dict[int, BlockCall]) -> torch.Tensor:
    """The final norm's output when block `layer` outputs `hidden_BLD`: blocks layer+1.. (called as the clean
    pass saw the model call each of them), then the final norm. Feed it to `logits`."""
    h_BLD = hidden_BLD
    for index in range(layer + 1, len(tail.blocks)):
        call = calls[index]
        h_BLD = _hidden(tail.blocks[index](h_BLD, *call.args, **call.kwargs))
    return tail.norm(h_BLD)


def splice(hidden_BLD: torch.Tensor, replace: Replacement, pos_L: torch.Tensor) -> torch.Tensor:
    """`hidden_BLD` with positions 1..L-1 replaced by `replace(x, pos)` (raw scale, float32); BOS kept."""
    B, L, D = hidden_BLD.shape
    x_ND = hidden_BLD[:, 1:].reshape(-1, D).float()
    new_ND = replace(x_ND, pos_L[1:].repeat(B))
    out_BLD = hidden_BLD.clone()
    out_BLD[:, 1:] = new_ND.reshape(B, L - 1, D).to(hidden_BLD.dtype)
    return out_BLD


def zero(x_ND: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_ND)


def denormalise(store: ActivationStore, x_norm_ND: torch.Tensor) -> torch.Tensor:
    """The raw activation whose `store.normalise` is `x_norm_ND`: x / scale + μ."""
    return x_norm_ND / store.scale + torch.from_numpy(np.asarray(store.mean_D, dtype=np.float32)).to(x_norm_ND.device)


def sae_replacement(sae: SAE, store: ActivationStore) -> Replacement:
    """The SAE's reconstruction on the raw scale: normalise with the store's μ and scale, reconstruct, undo."""
    device = sae.W_dec_KD.device

    def replace(x_ND: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
        x_hat_ND = sae(store.normalise(x_ND.cpu()).to(device), pos_N.to(device)).x_hat.float()
        return denormalise(store, x_hat_ND.cpu()).to(x_ND.device)

    return replace


# --------------------------------------------------------------------------- per-token losses


@torch.inference_mode()
def token_losses(tail: Tail, clean_ND: torch.Tensor, finals: list[torch.Tensor], targets_N: torch.Tensor,
                 chunk: int = TOKEN_CHUNK, vocab_block: int = VOCAB_BLOCK
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CE of the clean predictions [N], and CE and KL(clean ‖ other) of each of `finals` [R, N].

    `clean_ND` and `finals` are final-norm outputs (`clean_pass`, `run_from`). With z the logits (of the clean
    pass, c, and of another, r) and lse their log-sum-exp,

        CE = lse − z[target]        KL(p_c ‖ p_r) = Σ_v p_c,v (z_c,v − z_r,v) + lse_r − lse_c

    both accumulated over blocks of `vocab_block` logits with a running maximum (as an online softmax does), for
    `chunk` tokens of every pass at once: one matmul per block, and float32 work on tiles of a few MB.
    Logits are computed in the forward dtype (`logits`), everything after in float32.
    """
    N, R = len(targets_N), len(finals)
    ce_NP, kl_NR = torch.empty(N, R + 1), torch.empty(N, R)
    vocab = tail.head.out_features
    for s in range(0, N, chunk):
        h_CPD = torch.stack([clean_ND[s:s + chunk], *(f[s:s + chunk] for f in finals)], dim=1)
        C, P, D = h_CPD.shape
        h_MD = h_CPD.reshape(C * P, D)  # token-major: the passes of one token are neighbours
        t_C = targets_N[s:s + chunk].to(h_MD.device)
        max_CP = torch.full((C, P), -torch.inf, device=h_MD.device)
        sum_CP = torch.zeros(C, P, device=h_MD.device)  # Σ exp(z − max)
        cross_CP = torch.zeros(C, P, device=h_MD.device)  # Σ exp(z_c − max_c) · z
        target_CP = torch.zeros(C, P, device=h_MD.device)
        for v0 in range(0, vocab, vocab_block):
            z_CPV = logits(tail, h_MD, slice(v0, v0 + vocab_block)).float().view(C, P, -1)
            hit_C = (t_C >= v0) & (t_C < v0 + vocab_block)
            if hit_C.any():
                rows = hit_C.nonzero().flatten()
                target_CP[rows] = z_CPV[rows, :, t_C[rows] - v0]
            new_max_CP = torch.maximum(max_CP, z_CPV.amax(-1))
            rescale_CP = torch.exp(max_CP - new_max_CP)
            w_CV1 = torch.exp(z_CPV[:, 0] - new_max_CP[:, :1]).unsqueeze(-1)  # clean softmax weights, unnormalised
            cross_CP = cross_CP * rescale_CP[:, :1] + torch.bmm(z_CPV, w_CV1).squeeze(-1)
            sum_CP = sum_CP * rescale_CP + z_CPV.sub_(new_max_CP.unsqueeze(-1)).exp_().sum(-1)
            max_CP = new_max_CP
        lse_CP = max_CP + sum_CP.log()
        ce_NP[s:s + C] = (lse_CP - target_CP).cpu()
        kl_NR[s:s + C] = ((cross_CP[:, :1] - cross_CP[:, 1:]) / sum_CP[:, :1] + lse_CP[:, 1:] - lse_CP[:, :1]).cpu()
    return ce_NP[:, 0], ce_NP[:, 1:].T.contiguous(), kl_NR.T.contiguous()


# --------------------------------------------------------------------------- the validation tokens


def fidelity_sequences(store: ActivationStore, n_sequences: int, seed: int) -> np.ndarray:
    """Ids of `n_sequences` whole validation sequences drawn with `seed` (all when there are fewer), sorted."""
    seqs = np.unique(np.asarray(store.seq_N))
    if n_sequences < len(seqs):
        seqs = np.sort(np.random.default_rng(seed).choice(seqs, n_sequences, replace=False))
    return seqs


def token_ids(store: ActivationStore, seqs: np.ndarray, bos_id: int) -> tuple[torch.Tensor, np.ndarray]:
    """The input ids [S, L] of the store's sequences `seqs` (sorted) and their rows in the store [S, P].

    The ids are what capture fed the model: BOS, then the stored tokens in position order (a store that
    keeps BOS holds it at position 0 itself). The store is written sequence by sequence, positions ascending.
    """
    L = store.seq_len
    seq_N, pos_N = np.asarray(store.seq_N), np.asarray(store.pos_N)
    rows = np.flatnonzero(np.isin(seq_N, seqs))
    first = int(pos_N[rows].min()) if len(rows) else L
    P = L - first
    rows_SP = rows.reshape(len(seqs), P) if first <= 1 and len(rows) == len(seqs) * P else None
    if rows_SP is None or (pos_N[rows_SP] != np.arange(first, L)).any() or (seq_N[rows_SP] != seqs[:, None]).any():
        raise StoreError(f"{store.path}: sequences {seqs[:4].tolist()}... do not hold one row for each position "
                         f"1..{L - 1}, in order. {RECAPTURE}")
    ids_SL = np.full((len(seqs), L), bos_id, dtype=np.int64)
    ids_SL[:, first:] = np.asarray(store.tokens_N)[rows_SP]
    return torch.from_numpy(ids_SL), rows_SP


def check_against_store(store: ActivationStore, hidden_BLD: torch.Tensor, rows_BP: np.ndarray) -> None:
    """The clean pass's output of the store's layer must be the stored activation of those tokens."""
    stored_BPD = store.raw(rows_BP.reshape(-1)).reshape(*rows_BP.shape, -1)
    ours_BPD = hidden_BLD[:, hidden_BLD.shape[1] - rows_BP.shape[1]:].float().cpu()
    error = float((ours_BPD - stored_BPD).norm() / stored_BPD.norm().clamp_min(1e-12))
    if not error <= STORE_TOLERANCE:
        raise StoreError(f"{store.path}: the model's output at layer {store.meta.get('layer')} differs from the "
                         f"stored activations by {error:.3g} (relative): the store was not captured from this "
                         f"model and these tokens. {RECAPTURE}")


# --------------------------------------------------------------------------- measuring


class TokenLosses(NamedTuple):
    """Per-token losses of one layer's passes over the predicting positions of the sample."""

    pos_N: np.ndarray  # predicting position t (the token predicted is t + 1)
    ce_clean_N: np.ndarray
    ce: dict[Any, np.ndarray]  # replacement key -> per-token CE
    kl: dict[Any, np.ndarray]  # replacement key -> per-token KL(clean ‖ replaced)


@torch.inference_mode()
def measure(loaded: models.Loaded, ids_SL: torch.Tensor, layer: int, replacements: dict[Any, Replacement],
            batch_size: int, store: ActivationStore | None = None, rows_SP: np.ndarray | None = None,
            tail: Tail | None = None) -> TokenLosses:
    """Per-token losses of the clean model and of each replacement of `layer`'s output (keys as given).

    Sequences go through the model `batch_size` at a time, one clean pass per batch; `store` with `rows_SP`
    (`token_ids`) checks the layer's clean output against the validation store. On the CPU the spliced passes
    and the losses are shared out to as many single-threaded workers as torch has threads: one thread team per
    op would synchronise on every one of ~10^5 small ops, and on a 2-core machine where another process holds a
    core each of them waits for a descheduled thread (the losses ran at 4.3 ms per token and pass on a team of
    two, 1.35 on one thread, 0.75 on two single-threaded workers, with another process busy).
    """
    tail = model_tail(loaded.model) if tail is None else tail
    L = ids_SL.shape[1]
    pos_L = torch.arange(L, device=loaded.device)
    workers = torch.get_num_threads() if loaded.device.type == "cpu" else 1

    @torch.inference_mode()
    def spliced(cp: CleanPass, replace: Replacement) -> torch.Tensor:
        return run_from(tail, layer, splice(cp.hidden[layer], replace, pos_L), cp.calls)[:, 1:L - 1]

    clean, finals = [], {key: [] for key in replacements}
    with _single_threaded(workers > 1), ThreadPoolExecutor(workers) as pool:
        for s in range(0, len(ids_SL), batch_size):
            cp = clean_pass(loaded.model, ids_SL[s:s + batch_size].to(loaded.device), [layer], tail)
            if store is not None:
                check_against_store(store, cp.hidden[layer], rows_SP[s:s + batch_size])
            clean.append(cp.final_BLD[:, 1:L - 1])
            for key, final in zip(replacements, pool.map(functools.partial(spliced, cp), replacements.values())):
                finals[key].append(final)
        D = clean[0].shape[-1]
        clean_ND = torch.cat(clean).reshape(-1, D)
        others = [torch.cat(f).reshape(-1, D) for f in finals.values()]
        targets_N = ids_SL[:, 2:].reshape(-1)
        parts = [slice(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(len(targets_N)), workers) if len(a)]
        losses = list(pool.map(lambda p: token_losses(tail, clean_ND[p], [f[p] for f in others], targets_N[p]), parts))
    ce_clean_N, ce_RN, kl_RN = (torch.cat([part[i] for part in losses], dim=-1) for i in range(3))
    return TokenLosses(np.tile(np.arange(1, L - 1), len(ids_SL)), ce_clean_N.numpy(),
                       dict(zip(replacements, ce_RN.numpy())), dict(zip(replacements, kl_RN.numpy())))


@contextlib.contextmanager
def _single_threaded(on: bool) -> Iterator[None]:
    """torch on one thread inside (when `on`), its thread count restored after."""
    before = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ce_score(ce_clean: float, ce_zero: float, ce_spliced: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 = nothing lost, 0 = as bad as zero-ablating the layer."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def summarise(tl: TokenLosses, key: Any, zero_key: Any, seq_len: int, buckets: int) -> tuple[dict, pd.DataFrame]:
    """The pooled row and the per-bucket rows of replacement `key`, against the zero ablation `zero_key`."""

    def row(mask: np.ndarray) -> dict[str, float]:
        c, z, s = (float(a[mask].mean()) for a in (tl.ce_clean_N, tl.ce[zero_key], tl.ce[key]))
        return {"ce_clean": c, "ce_zero": z, "ce_spliced": s, "ce_score": ce_score(c, z, s),
                "kl_spliced": float(tl.kl[key][mask].mean()), "kl_zero": float(tl.kl[zero_key][mask].mean()),
                "tokens": int(mask.sum())}

    bucket_N = position_bucket(tl.pos_N, seq_len, buckets)
    by_bucket = pd.DataFrame([{"bucket": int(b), **row(bucket_N == b)} for b in np.unique(bucket_N)])
    return row(np.ones(len(tl.pos_N), dtype=bool)), by_bucket


# --------------------------------------------------------------------------- runs on disk


class FidelityResult(NamedTuple):
    runs: pd.DataFrame  # one row per run, columns `COLUMNS`
    by_position: pd.DataFrame  # one row per run and bucket, columns `BY_POSITION_COLUMNS`


def fidelity_all(cfg: Config, variants: str | Iterable[str] | None = None, progress: bool = True) -> FidelityResult:
    """Splice every finished run of `cfg` (or of `variants`) into the model at its layer; writes
    runs/<config>/fidelity.csv and fidelity_by_position.csv atomically.

    With `variants` a subset, the files keep the other variants' rows from an earlier call (the returned
    frames hold only the requested ones). Runs are checked against the validation store's normalisation
    before the model is loaded; the model loads once, in the dtype the stores were captured in.
    """
    names = as_variant_list(variants)
    folders = checkpoint.find_runs(cfg, names)
    stores = open_layer_stores(cfg, "val")
    infos = {folder: checkpoint.read_info(folder) for folder in folders}
    for folder, info in infos.items():
        check_normalisation(folder, stores[info["layer"]])
    layers = sorted({info["layer"] for info in infos.values()})
    dtypes = {stores[layer].meta["forward_dtype"] for layer in layers}
    if len(dtypes) != 1:
        raise StoreError(f"{run_dir(cfg.name) / 'activations'}: the validation stores of layers {layers} were "
                         f"captured in different dtypes ({', '.join(sorted(dtypes))}). {RECAPTURE}")
    keep_freed_memory()  # the forward's MB-sized activations: reused, not zero-filled afresh (posae.memory)
    loaded = models.load_model(dataclasses.replace(cfg.model, dtype=dtypes.pop()))
    tail = model_tail(loaded.model)
    store = stores[layers[0]]
    seqs = fidelity_sequences(store, cfg.probe.fidelity_sequences, cfg.probe.seed)
    ids_SL, rows_SP = token_ids(store, seqs, loaded.tokenizer.bos_token_id)
    rows, by_position = [], []
    with progress_bar(total=len(folders), desc="fidelity", unit="runs", enabled=progress) as bar:
        for layer in layers:
            here = [folder for folder in folders if infos[folder]["layer"] == layer]
            replacements: dict[Any, Replacement] = {"zero": zero}
            replacements.update({folder: sae_replacement(checkpoint.load_sae(folder, loaded.device), stores[layer])
                                 for folder in here})
            losses = measure(loaded, ids_SL, layer, replacements, cfg.capture.batch_size, store=stores[layer],
                             rows_SP=rows_SP, tail=tail)
            for folder in here:
                ident = {key: infos[folder][key] for key in RUN_KEYS}
                pooled, by_bucket = summarise(losses, folder, "zero", store.seq_len, cfg.sae.buckets)
                rows.append({**ident, **pooled, "sequences": len(seqs)})
                by_position.append(by_bucket.assign(**ident))
            bar.update(len(here))
    result = FidelityResult(_ordered(pd.DataFrame(rows, columns=COLUMNS)),
                            _ordered(pd.concat(by_position, ignore_index=True)[BY_POSITION_COLUMNS]))
    write_fidelity(cfg, result, names)
    return result


def write_fidelity(cfg: Config, result: FidelityResult, variants: list[str] | None = None) -> None:
    """Both tables under runs/<config>/, atomically; with `variants`, other variants' rows are kept."""
    paths = [run_dir(cfg.name) / name for name in (FIDELITY_CSV, FIDELITY_BY_POSITION_CSV)]
    # Read, merge and write under one lock: notebooks 04 run by hand side by side merge into the same tables.
    with locked(lock_path(paths[0], "merge"), f"updating {FIDELITY_CSV}"):
        for path, df in zip(paths, result):
            if variants is not None and path.exists():
                old = pd.read_csv(path)
                df = _ordered(pd.concat([old[~old["variant"].isin(variants)], df], ignore_index=True))
            write_csv_atomic(df, path)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    by = RUN_KEYS + (["bucket"] if "bucket" in df else [])
    return df.sort_values(by).reset_index(drop=True)
