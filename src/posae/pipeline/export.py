"""Export a trained SAE run to SAELens: ``python -m posae export-saelens RUN_DIR OUT_DIR``.

OUT_DIR gets what the installed sae-lens 6.x release itself writes with ``SAE.save_model``, so
``sae_lens.SAE.load_from_disk(OUT_DIR)`` returns a ``StandardSAE``:

    cfg.json                  architecture "standard", d_in, d_sae, dtype float32,
                              apply_b_dec_to_input true, normalize_activations "none", and metadata
                              (model_name, hook_name, context_size, ... and a "posae" block with the
                              variant, layer, seed, full run config and the folded scale s)
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec

Normalisation is folded into the weights. Our SAEs see z = (x − μ)·s (the training mean μ and
the scale s that makes the mean ‖z‖² equal d; `posae.data.store`). SAELens's standard SAE computes
f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec, so with

    W_enc' = s·W_enc      b_enc' = b_enc      W_dec' = W_dec / s      b_dec' = b_dec / s + μ

it maps a *raw* residual-stream activation x to exactly our features f(z), and its x̂ is our
reconstruction mapped back to the raw scale, x̂_z / s + μ. This is the same fold SAELens applies
to its own ``expected_average_only_in`` scaling (``fold_activation_norm_scaling_factor``), with the
centring added to b_dec; none of its run-time ``normalize_activations`` options centres by a fixed
mean (``layer_norm`` centres each token by its own mean), so folding is the exact choice. Feature
activations are unchanged; decoder rows have norm 1/s instead of 1 (``fold_W_dec_norm`` would
rescale the features by 1/s to make them unit).

Only variants whose inference is exactly that standard ReLU SAE export: the class must use the
base SAE's forward pass unchanged and hold nothing but the four standard parameters, and the
forward is checked numerically against the formula above. baseline and position_weighted (whose
loss weights live in the objective only) qualify; the position-aware variants refuse before
anything is written, naming what SAELens lacks: its SAEs compute features from the activation
alone (``encode(x)`` has no position argument), with no position embeddings, per-position masks
or gates, attention routing or position terms in the reconstruction. The written checkpoint is
loaded back with SAELens and compared with our SAE before it is moved into place, atomically.

sae-lens is an optional extra (``pip install -e '.[saelens]'``), imported only here and only once
the run has been found exportable.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from posae import checkpoint
from posae.paths import REPO_ROOT, atomic_dir, clean_stale_temps, runs_root
from posae.saes import REGISTRY, SAE

INSTALL_HINT = "pip install -e '.[saelens]'"
# The only state of a standard SAE: SAELens's W_enc, b_enc, W_dec, b_dec.
STANDARD_PARAMS = ("W_enc_DK", "b_enc_K", "W_dec_KD", "b_dec_D")
# The parts of the base SAE's forward pass a standard-exportable variant must not replace.
FORWARD_METHODS = ("pre_acts", "encode", "decode", "forward", "gates")
SAELENS_LACKS = ("its SAEs compute their features from the activation alone, f = ReLU(W_enc (x − b_dec) + b_enc) "
                 "with encode(x) taking no token position, and none of its architectures has position "
                 "embeddings, per-position masks or gates, attention routing or a position term in the "
                 "reconstruction")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- what can be exported


def overridden_methods(cls: type[SAE]) -> list[str]:
    """The parts of the forward pass `cls` replaces, as qualified names (e.g. 'Hierarchical.encode')."""
    return [getattr(cls, m).__qualname__ for m in FORWARD_METHODS if getattr(cls, m) is not getattr(SAE, m)]


def exportable_variants() -> list[str]:
    """Registered variants whose class keeps the standard forward pass (the candidates for export)."""
    return sorted(name for name, cls in REGISTRY.items() if not overridden_methods(cls))


def blockers(sae: SAE) -> list[str]:
    """What in `sae`'s inference a SAELens StandardSAE cannot compute; empty when it is exactly one."""
    found = []
    if sae.gates(torch.arange(sae.seq_len)) is not None:
        found.append("a per-position mask or gate multiplies its position features")
    own = overridden_methods(type(sae))
    if own:
        found.append(f"its forward pass is its own ({', '.join(own)}), reading the token position")
    extra = [n for n, _ in itertools.chain(sae.named_parameters(), sae.named_buffers()) if n not in STANDARD_PARAMS]
    if extra:
        found.append(f"it has state beyond W_enc, b_enc, W_dec and b_dec ({', '.join(extra)})")
    return found


def check_exportable(sae: SAE, variant: str) -> None:
    """Raise ExportError naming the variant and why, unless `sae` is exactly a standard ReLU SAE at inference."""
    found = blockers(sae)
    if not found:
        mismatch = standard_mismatch(sae)
        if mismatch:
            found.append(mismatch)
    if found:
        raise ExportError(f"{variant} cannot be exported to SAELens: {'; '.join(found)}. SAELens has no place for "
                          f"that: {SAELENS_LACKS}. "
                          f"Variants that export: {', '.join(exportable_variants())}")


@torch.no_grad()
def standard_mismatch(sae: SAE, n: int = 256) -> str | None:
    """None if sae(x, t) equals the plain ReLU SAE formula at every position t, else how it differs.

    The structural checks say the class keeps the standard forward pass; this catches anything
    else that changes it (a property, a hook), on random inputs of the normalised scale.
    """
    g = torch.Generator().manual_seed(0)
    n = max(n, sae.seq_len)  # every position at least once
    p = {name: getattr(sae, name).detach().double() for name in STANDARD_PARAMS}
    z_BD = torch.randn(n, sae.d_model, generator=g)
    pos_B = torch.arange(n) % sae.seq_len
    f_BK = torch.relu((z_BD.double() - p["b_dec_D"]) @ p["W_enc_DK"] + p["b_enc_K"])
    x_hat_BD = f_BK @ p["W_dec_KD"] + p["b_dec_D"]
    out = sae(z_BD, pos_B)
    for what, ours, ref in (("features", out.features, f_BK), ("reconstruction", out.x_hat, x_hat_BD)):
        try:
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
        except AssertionError:
            err = float((ours.double() - ref).abs().max())
            return f"its {what} differ from the standard formula ReLU(W_enc (x − b_dec) + b_enc) by up to {err:.3g}"
    return None


# --------------------------------------------------------------------------- the fold


@torch.no_grad()
def folded_weights(sae: SAE, mean_D: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """SAELens StandardSAE weights that take raw activations: the normalisation (x − μ)·s folded in (module docstring)."""
    W_enc, b_enc = sae.W_enc_DK.double(), sae.b_enc_K.double()
    W_dec, b_dec, mean = sae.W_dec_KD.double(), sae.b_dec_D.double(), mean_D.double()
    folded = {"W_enc": W_enc * scale, "b_enc": b_enc, "W_dec": W_dec / scale, "b_dec": b_dec / scale + mean}
    return {k: v.float().contiguous() for k, v in folded.items()}


def metadata(info: dict[str, Any], scale: float) -> dict[str, Any]:
    """cfg.json's metadata: SAELens's own keys where they apply, everything of ours under 'posae'."""
    cfg = info["config"]
    return {
        "model_name": cfg["model"]["name"],
        # Our layer L is the output of decoder block L (hidden_states[L + 1]): TransformerLens's resid_post.
        "hook_name": f"blocks.{info['layer']}.hook_resid_post",
        "hook_head_index": None,
        "context_size": info["seq_len"],
        "prepend_bos": True,
        "dataset_path": cfg["corpus"]["name"],
        "posae": {
            "variant": info["variant"], "layer": info["layer"], "seed": info["seed"], "step": info["step"],
            "groups": info.get("groups"), "run_hash": info.get("run_hash"), "git_commit": info.get("git_commit"),
            "posae_version": info.get("posae_version"), "store_hash": (info.get("store") or {}).get("hash"),
            # The mean is folded into b_dec; the run folder keeps it (weights.safetensors: normalisation.mean_D).
            "normalisation": {"folded": True, "scale": scale, "centred": True},
            "note": ("normalisation folded into the weights: the SAE takes raw residual-stream activations (the output "
                     f"of decoder block {info['layer']} of {cfg['model']['name']}, Hugging Face hidden_states"
                     f"[{info['layer'] + 1}]); its features equal posae's on (x - mean) * scale, decoder rows have "
                     f"norm 1/scale. Trained without the BOS token's activation: {cfg['corpus'].get('exclude_bos')}. "
                     "In TransformerLens load the model without weight processing (from_pretrained_no_processing) "
                     "so that resid_post is the unprocessed residual stream"),
            "config": cfg,
        },
    }


# --------------------------------------------------------------------------- export


def import_sae_lens() -> Any:
    try:
        import sae_lens
    except ImportError as e:
        raise ExportError(f"export-saelens needs sae-lens, which is not installed ({e}). "
                          f"Fix: {INSTALL_HINT}") from None
    return sae_lens


def export_saelens(run_dir: Path | str, out_dir: Path | str, force: bool = False) -> Path:
    """Write the run in `run_dir` as a SAELens checkpoint in `out_dir`; returns `out_dir`.

    Every refusal (no run, an unfinished run, a variant SAELens cannot represent, a non-empty
    `out_dir` without `force`, sae-lens missing) comes before anything is written.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = checkpoint.read_info(run_dir)
    if info is None:
        raise ExportError(f"{run_dir}: no {checkpoint.INFO}, so no trained SAE here. Fix: pass a run folder "
                          "such as runs/default/saes/baseline/layer_8/seed_0")
    if not info.get("done"):
        raise ExportError(f"{run_dir}: the run is unfinished (step {info.get('step')} of {info.get('steps')}). "
                          "Fix: finish training it first (notebook 03_train resumes it)")
    sae = checkpoint.load_sae(run_dir).float()
    check_exportable(sae, info["variant"])
    check_out_dir(out_dir, run_dir, force)
    mean_D, scale = checkpoint.load_normalisation(run_dir)
    sae_lens = import_sae_lens()
    weights = folded_weights(sae, mean_D, scale)
    cfg = sae_lens.StandardSAEConfig.from_dict({
        "architecture": "standard", "d_in": sae.d_model, "d_sae": sae.k, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": metadata(info, scale),
    })
    exported = sae_lens.StandardSAE(cfg)
    exported.load_state_dict(weights)
    clean_stale_temps(out_dir.parent, out_dir.name)
    with atomic_dir(out_dir) as tmp:
        exported.save_model(tmp)
        verify_roundtrip(sae_lens.SAE.load_from_disk(str(tmp)), sae, mean_D, scale, out_dir)
    return out_dir


def check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents or run in out.parents:
        raise ExportError(f"{out_dir} overlaps the run folder {run_dir}; writing there would replace or nest in "
                          "the run. Fix: choose an OUT_DIR outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder. Fix: pass a folder path for OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ExportError(f"{out_dir} already exists and is not empty. Fix: choose another OUT_DIR, or pass "
                              "--force (force=True) to replace it")
        found = pipeline_products(out)
        if found:
            raise ExportError(f"{out_dir}: --force would delete it, but {found}. Fix: choose an OUT_DIR that holds "
                              "no products of the pipeline and lies outside runs/, e.g. exports/<name>; --force is for "
                              "replacing an earlier export")


def pipeline_products(folder: Path) -> str | None:
    """What in `folder` (resolved) belongs to the pipeline, said as a clause; None when nothing does.

    --force replaces OUT_DIR whole, so it must never be a runs/ root (the configured one or the
    repository's), lie inside one or hold one, nor hold a trained run (config.json beside
    weights.safetensors) or an activation store (meta.json beside acts.npy) of any config.
    """
    for root in dict.fromkeys((runs_root().resolve(), (REPO_ROOT / "runs").resolve())):
        if folder == root or root in folder.parents:
            return f"it is inside the runs folder {root}, which holds every config's products"
        if folder in root.parents:
            return f"it holds the runs folder {root}, which holds every config's products"
    for marker, partner, what in ((checkpoint.INFO, checkpoint.WEIGHTS, "a trained SAE run"),
                                  ("meta.json", "acts.npy", "an activation store")):
        for found in sorted(folder.rglob(marker)):
            if (found.parent / partner).is_file():
                return f"it holds {what}, {found.parent}"
    return None


@torch.no_grad()
def verify_roundtrip(loaded: Any, sae: SAE, mean_D: torch.Tensor, scale: float, out_dir: Path, n: int = 256) -> None:
    """The checkpoint as SAELens loads it must reproduce our features and reconstruction on raw activations."""
    x_BD = raw_like(mean_D, scale, n)
    ours = reconstruct_raw(sae, x_BD, mean_D, scale)
    f_BK = loaded.encode(x_BD)
    x_hat_BD = loaded.decode(f_BK)
    try:
        torch.testing.assert_close(f_BK, ours.features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat_BD, ours.x_hat, rtol=1e-4, atol=1e-4 / scale)
    except AssertionError as e:
        raise ExportError(f"{out_dir}: the exported SAE, loaded back with sae-lens {loaded.cfg.metadata.sae_lens_version},"
                          f" does not reproduce the posae SAE, so nothing was written ({e}). This is a posae bug: "
                          "please report it") from None


def raw_like(mean_D: torch.Tensor, scale: float, n: int, seed: int = 0) -> torch.Tensor:
    """Random activations on the raw scale of the run's store: μ + ε/s with ε ~ N(0, I), so mean ‖z‖² ≈ d."""
    g = torch.Generator().manual_seed(seed)
    return mean_D.float() + torch.randn(n, mean_D.numel(), generator=g) / scale


@torch.no_grad()
def reconstruct_raw(sae: SAE, x_BD: torch.Tensor, mean_D: torch.Tensor, scale: float):
    """Our SAE applied to raw activations the way the pipeline does (normalise, forward, map back to raw)."""
    z_BD = (x_BD - mean_D) * scale
    out = sae(z_BD, torch.zeros(len(x_BD), dtype=torch.long))  # exportable variants ignore the position
    return out._replace(x_hat=out.x_hat / scale + mean_D)
