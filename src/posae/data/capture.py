"""Capture the residual stream after the configured decoder layers into activation stores.

Layer L is the output of decoder block L counting from 0, i.e. ``hidden_states[L + 1]`` of a full
forward with ``output_hidden_states=True``. We read it with forward hooks on the blocks instead, and
the hook of the deepest configured block stops the forward pass by raising: the blocks above it,
the final norm and the unembedding (a third of Gemma 3 270M's parameters) never run. Reading the
last hidden state of a model cut short (``num_hidden_layers`` lowered) would be wrong: transformers
applies the final norm to it.

Stores are written per (layer, split) through `posae.data.store.StoreWriter`, training split first so
that validation gets the training mean and scale. Each store's content hash covers the model,
corpus and capture settings, the resolved forward dtype and device, and the token ids; a complete
store with the same hash whose files still have the digests its meta.json records is reused, and the
model is not even loaded when all of them are. A store whose data changed is recaptured, saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from posae.config import Config
from posae.memory import keep_freed_memory
from posae.paths import activations_dir, clean_stale_temps, locked

# Bump when the capture changes what a store contains, so that old stores are recomputed.
CAPTURE_VERSION = 1
SPLITS = ("train", "val")


class _StopForward(Exception):
    """Raised by the deepest layer's hook: everything we need has been computed."""


# --------------------------------------------------------------------------- hooks


def decoder_layers(model: Any) -> Any:
    """The model's stack of decoder blocks: the outermost nn.ModuleList as long as its layer count.

    Found by shape rather than by attribute name (Gemma and Llama: model.layers, GPT-2:
    transformer.h, GPT-NeoX: gpt_neox.layers, OPT: model.decoder.layers), so any causal LM works
    without model-specific code. Lists inside another such list (say, n experts in each of n
    blocks) are not candidates: they live inside the blocks.
    """
    import torch

    n = model.config.get_text_config().num_hidden_layers
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    stacks = [(name, m) for name, m in stacks if not any(name.startswith(outer + ".") for outer, _ in stacks)]
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise RuntimeError(f"{type(model).__name__}: expected one nn.ModuleList of {n} decoder blocks, found {found}. "
                           "posae cannot tell which holds the decoder blocks of this model")
    return stacks[0][1]


@contextlib.contextmanager
def layer_outputs(model: Any, layers: tuple[int, ...] | list[int], stop: bool = True) -> Iterator[dict[int, Any]]:
    """Hook the given decoder blocks; after a forward, the yielded dict maps layer -> output [B, L, D].

    With `stop`, the deepest block's hook ends the forward pass (call the model through `run_to`).
    """
    blocks = decoder_layers(model)
    deepest = max(layers)
    out: dict[int, Any] = {}

    def hook(layer: int):
        def fn(module, args, output):
            out[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == deepest:
                raise _StopForward

        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def run_to(model: Any, input_ids_BL: Any) -> None:
    """Forward pass that ends at the deepest hooked layer (see `layer_outputs`)."""
    import torch

    try:
        model(input_ids=input_ids_BL, attention_mask=torch.ones_like(input_ids_BL), use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the forward pass ran to the end: the deepest layer's hook never fired")


# --------------------------------------------------------------------------- hashing and paths


def tokens_hash(seqs: Any) -> str:
    h = hashlib.sha256()
    for arr in (seqs.train_SL, seqs.val_SL):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def store_hash(cfg: Config, layer: int, split: str, forward_dtype: str, device: str, token_hash: str) -> str:
    """Content hash of one store: what went in (settings, resolved dtype and device, token ids)."""
    from posae.data.store import store_settings  # late: the store pulls in torch

    blob = {"version": CAPTURE_VERSION, **store_settings(cfg, layer), "split": split, "forward_dtype": forward_dtype,
            "device": device, "tokens": token_hash}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def store_paths(cfg: Config) -> dict[tuple[int, str], Path]:
    """Each store's folder: under runs/<cfg.stores_name>/, an ancestor's when a derived config shares its stores."""
    return {(layer, split): activations_dir(cfg.stores_name, layer, split)
            for split in SPLITS for layer in cfg.capture.layers}


# --------------------------------------------------------------------------- capture


def validate(cfg: Config) -> Any:
    """The model and corpus checks of `posae.checks.load_config`, for configs built in code; returns the model's
    ModelInfo. (Not the variants: capture reads none.)"""
    from posae.data import corpus, models

    info = models.describe(cfg.model, cfg.source)
    models.check_fit(cfg, cfg.source, info)
    corpus.check(cfg.corpus, cfg.source)
    return info


def capture(cfg: Config, progress: bool = True) -> dict[tuple[int, str], Path]:
    """Capture every configured layer for both splits; returns {(layer, split): store folder}.

    Stores whose content hash matches are reused; if all match, the model is not loaded.
    """
    from posae.data.store import capture_lock

    validate(cfg)
    # One capture per config at a time; readers of the stores (`open_layer_stores`) wait for it.
    with locked(capture_lock(cfg), f"capturing the activations of {cfg.name}"):
        return _capture(cfg, progress)


def _capture(cfg: Config, progress: bool) -> dict[tuple[int, str], Path]:
    from posae.data import corpus, models
    from posae.data.store import ActivationStore, store_settings

    device = models.resolve_device(cfg.model.device)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    tokenizer = models.load_tokenizer(cfg.model)
    seqs = corpus.load_sequences(cfg.corpus, tokenizer, progress=progress, path=cfg.source)
    token_hash = tokens_hash(seqs)
    dtype_name = str(dtype).removeprefix("torch.")
    paths = store_paths(cfg)
    for path in paths.values():  # what a killed capture left beside a store, even one reused below
        clean_stale_temps(path.parent, path.name)
    hashes = {key: store_hash(cfg, key[0], key[1], dtype_name, device.type, token_hash) for key in paths}

    todo_train = [layer for layer in cfg.capture.layers if not reusable(paths[layer, "train"], hashes[layer, "train"])]
    # Validation is normalised with the training statistics: a new training store means a new validation store.
    todo_val = [layer for layer in cfg.capture.layers
                if layer in todo_train or not reusable(paths[layer, "val"], hashes[layer, "val"])]
    reused = [layer for layer in cfg.capture.layers if layer not in todo_train + todo_val]
    if reused and progress:
        print(f"posae: reusing the stores of layers {reused} (content hash unchanged, every file's digest checked)",
              file=sys.stderr)
    if not todo_train and not todo_val:
        return paths

    # The forward's MB-sized activations reused rather than zero-filled afresh by the kernel (posae.memory): the
    # float32 forward 631 -> 773 tokens/s on an AVX2-only EPYC, the stores byte for byte the same.
    keep_freed_memory()
    loaded = models.load_model(cfg.model, tokenizer=tokenizer)
    common = {"model": cfg.model.name, "model_layers": loaded.info.num_layers, "forward_dtype": dtype_name,
              "device": device.type, "corpus": cfg.corpus.name, "seq_len": cfg.corpus.seq_len,
              "exclude_bos": cfg.corpus.exclude_bos, "tokens_hash": token_hash, "capture_version": CAPTURE_VERSION,
              "pos_origin": "position 0 is BOS"}
    for split, layers, seqs_SL, n_docs in (("train", todo_train, seqs.train_SL, seqs.train_docs),
                                           ("val", todo_val, seqs.val_SL, seqs.val_docs)):
        if not layers:
            continue
        metas = {layer: {**common, "layer": layer, "split": split, "hash": hashes[layer, split],
                         "settings": store_settings(cfg, layer), "n_sequences": len(seqs_SL),
                         "n_documents": n_docs} for layer in layers}
        stats = ({layer: ActivationStore.open(paths[layer, "train"], hashes[layer, "train"]) for layer in layers}
                 if split == "val" else {})
        _capture_split(loaded, seqs_SL, {layer: paths[layer, split] for layer in layers}, metas, stats,
                       cfg.capture.batch_size, cfg.corpus.exclude_bos, progress, desc=f"capture {split}")
    return paths


def reusable(path: Path, expect_hash: str) -> bool:
    """A complete, intact store of this content hash is at `path`. One that is there but not reusable
    (stale, truncated, its data changed) is said on stderr, with the file and why, before it is recaptured."""
    from posae.data.store import reason, store_problem

    problem = store_problem(path, expect_hash)
    if problem is not None and path.exists():
        print(f"posae: recapturing a store: {reason(problem)}", file=sys.stderr)
    return problem is None


def _capture_split(loaded: Any, seqs_SL: np.ndarray, out: dict[int, Path], metas: dict[int, dict],
                   stats: dict[int, Any], batch_size: int, exclude_bos: bool, progress: bool, desc: str) -> None:
    """One pass over `seqs_SL`, streaming every layer in `out` into its own store."""
    import torch

    from posae.data.store import StoreWriter
    from posae.progress import bar as progress_bar

    S, L = seqs_SL.shape
    first = 1 if exclude_bos else 0
    n_tokens = S * (L - first)
    D = loaded.info.hidden_size
    layers = sorted(out)
    norms = {layer: np.zeros(2) for layer in layers}  # running sums of BOS norms and of the other tokens' norms
    with contextlib.ExitStack() as stack:
        writers = {layer: stack.enter_context(StoreWriter(out[layer], n_tokens, D, metas[layer],
                                                          stats_from=stats.get(layer))) for layer in layers}
        acts = stack.enter_context(layer_outputs(loaded.model, layers))
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(progress_bar(total=S * L, unit="tok", unit_scale=True, enabled=progress,
                                               desc=f"{desc} layers {layers}"))
        pos_L = np.arange(L, dtype=np.int32)
        for s in range(0, S, batch_size):
            ids_BL = torch.from_numpy(np.ascontiguousarray(seqs_SL[s:s + batch_size])).long().to(loaded.device)
            B = ids_BL.shape[0]
            run_to(loaded.model, ids_BL)
            tokens_B = ids_BL[:, first:].reshape(-1).cpu().numpy()
            pos_B = np.tile(pos_L[first:], B)
            seq_B = np.repeat(np.arange(s, s + B, dtype=np.int32), L - first)
            for layer in layers:
                x_BLD = acts[layer].float().cpu()
                n_BL = x_BLD.norm(dim=-1)
                norms[layer] += (float(n_BL[:, 0].sum()), float(n_BL[:, 1:].sum()))
                writers[layer].append(x_BLD[:, first:].reshape(-1, D), tokens_B, pos_B, seq_B)
            acts.clear()
            bar.update(B * L)
        # Recorded even when BOS is excluded: it is why it is excluded (notebook 01 shows both).
        for layer in layers:
            writers[layer].meta.update(bos_norm=norms[layer][0] / S, token_norm=norms[layer][1] / (S * (L - 1)))


def params_run(model: Any, deepest: int) -> int:
    """Parameters of the decoder blocks up to `deepest`: the matmul work of an early-exit forward."""
    blocks = decoder_layers(model)
    return sum(p.numel() for block in blocks[: deepest + 1] for p in block.parameters())

