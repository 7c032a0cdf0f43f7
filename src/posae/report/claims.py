"""The verdicts on the paper's claims (claims.csv), computed from the numbers, never written by hand.

The paper's side of each claim is `posae.paper`; ours is Table 1 (`posae.report.tables.table1`) and
the ablations of notebook 05.

Verdicts (claims.csv), computed by `claims` from the numbers, never written by hand:

- **holds**: our mean ± std interval (over seeds and layers; a single run counts as std 0) overlaps the
  paper's interval: its mean ± std; for a bound ("L1 < 0.1") the half-line, cut at 0 for a
  non-negative quantity; for a point value with no spread (U = 0.0) the point widened by our
  measurement's noise (`u_noise`). A claim over several variants holds when it holds for each
  variant that can be compared.
- **differs**: the intervals do not overlap (for a claim over several variants: for at least one).
- **cannot be compared**: the paper's quantity has no stated scale (its MSE values: docs/decisions.md §9 compares
  their ratios and ordering instead), or we have no measurement (the variant was not trained).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

from posae.paper import ABLATION_CLAIMS, CLAIM_TEXT, L1_TARGET, MSE_RANGE, PAPER_ABLATIONS, PAPER_TABLE1, U_REPORTED
from posae.report.tables import BASELINE, RunTables, fmt, markdown_table, paper_ratio, table1

HOLDS, DIFFERS, CANNOT = "holds", "differs", "cannot be compared"
VERDICTS = (HOLDS, DIFFERS, CANNOT)
_NA = math.nan


# --------------------------------------------------------------------------- verdicts (pure)


def interval_verdict(mean: float, std: float, low: float, high: float) -> str:
    """holds when [mean − std, mean + std] overlaps [low, high]; differs when not; cannot be compared
    without a measurement. A NaN std (a single run) counts as 0."""
    if not np.isfinite(mean):
        return CANNOT
    std = std if np.isfinite(std) else 0.0
    return HOLDS if mean - std <= high and mean + std >= low else DIFFERS


def combine(verdicts: Iterable[str]) -> str:
    """A claim over several variants: differs if any differs, else holds if any holds, else cannot be compared."""
    verdicts = list(verdicts)
    return DIFFERS if DIFFERS in verdicts else HOLDS if HOLDS in verdicts else CANNOT


def extremes_verdict(ours: dict[str, float], paper: dict[str, float]) -> str:
    """holds when the variants with the paper's lowest and highest value are also ours, among the
    variants both measured; cannot be compared with fewer than two of them."""
    common = [v for v in paper if np.isfinite(paper[v]) and np.isfinite(ours.get(v, _NA))]
    if len(common) < 2:
        return CANNOT
    same_min = min(common, key=paper.get) == min(common, key=ours.get)
    same_max = max(common, key=paper.get) == max(common, key=ours.get)
    return HOLDS if same_min and same_max else DIFFERS


def u_noise(test_tokens: int, chance: float) -> float:
    """Two standard errors of U for true accuracies equal, on `test_tokens` held-out tokens.

    Each accuracy's variance is at most 0.25/n; their difference (taken as independent, which
    overstates it for probes scored on the same tokens) at most 0.5/n; U divides it by 1 − chance.
    """
    return 2.0 * math.sqrt(0.5 / max(test_tokens, 1)) / (1.0 - chance)


# --------------------------------------------------------------------------- claims


class Claim(NamedTuple):
    claim: str
    source: str
    paper: str
    ours: str
    verdict: str
    reason: str
    ours_mean: float = _NA
    ours_std: float = _NA
    paper_low: float = _NA
    paper_high: float = _NA


def _per_variant(table: pd.DataFrame, stat: str, bounds: dict[str, tuple[float, float]], digits: int,
                 percent: bool = False) -> tuple[str, list[tuple[str, str, str]]]:
    """Verdict of `stat` of each variant in `bounds` against its interval: (combined, [(variant, ours, verdict)])."""
    rows = table.set_index("variant")
    out = []
    for v, (low, high) in bounds.items():
        mean = float(rows.at[v, f"{stat}_mean"]) if v in rows.index else _NA
        std = float(rows.at[v, f"{stat}_std"]) if v in rows.index else _NA
        out.append((v, fmt(mean, std, digits, percent), interval_verdict(mean, std, low, high)))
    return combine(w for _, _, w in out), out


def _explain(parts: list[tuple[str, str, str]], paper: dict[str, str] | None = None) -> str:
    """One line: the variants that differ (ours vs the paper's), those that hold, those not measured."""
    differ = [f"{v} {o}" + (f" vs {paper[v]}" if paper else "") for v, o, w in parts if w == DIFFERS]
    hold = [v for v, _, w in parts if w == HOLDS]
    missing = [v for v, _, w in parts if w == CANNOT]
    text = ["no overlap for " + "; ".join(differ)] if differ else []
    if hold:
        text.append(("overlaps for " if differ else "overlaps for every variant: ") + ", ".join(hold))
    if missing:
        text.append("not measured: " + ", ".join(missing))
    return "; ".join(text)


def _mse_claims(table: pd.DataFrame) -> list[Claim]:
    measured = table[table["runs"] > 0]
    lo, hi = measured["mse_mean"].min(), measured["mse_mean"].max()
    paper_mse = {v: p.mse for v, p in PAPER_TABLE1.items()}
    low, high = MSE_RANGE
    range_claim = Claim(
        *CLAIM_TEXT["mse_range"],
        f"{low:.2f}–{high:.2f}", f"{lo:.3f}–{hi:.3f} (variant means, normalised scale)", CANNOT,
        "the paper does not state its MSE scale (ours: per element on centred, rescaled activations, where "
        "predicting the mean scores 1.0), so the values are not comparable: see the ratio and ordering rows",
        paper_low=low, paper_high=high)

    ratios = {v: paper_ratio(v) for v in PAPER_TABLE1 if v != BASELINE}
    bounds = {v: (r - s, r + s) for v, (r, s) in ratios.items()}
    verdict, parts = _per_variant(table, "mse_ratio", bounds, 2)
    paper_text = {v: fmt(r, s, 2) for v, (r, s) in ratios.items()}
    ratio_claim = Claim(
        *CLAIM_TEXT["mse_ratio"],
        ", ".join(f"{v} {r:.2f}" for v, (r, _) in ratios.items()),
        ", ".join(f"{v} {o}" for v, o, _ in parts), verdict,
        _explain(parts, paper_text) + " (ours: paired by layer and seed)")

    ours_mse = dict(zip(table["variant"], table["mse_mean"]))
    verdict = extremes_verdict(ours_mse, paper_mse)
    common = [v for v in paper_mse if np.isfinite(ours_mse.get(v, _NA))]
    order = " < ".join(sorted(common, key=ours_mse.get))
    lowest, highest = min(paper_mse, key=paper_mse.get), max(paper_mse, key=paper_mse.get)
    claim, source = CLAIM_TEXT["mse_order"]
    order_claim = Claim(
        claim.format(lowest=lowest, highest=highest), source,
        " < ".join(sorted(paper_mse, key=paper_mse.get)), order or "—", verdict,
        f"ours, by mean MSE: {order}" if common else "no variant of the paper's tables was measured")
    return [range_claim, ratio_claim, order_claim]


def _sparsity_claims(table: pd.DataFrame) -> list[Claim]:
    measured = table[table["runs"] > 0]
    bounds = {v: (0.0, L1_TARGET) for v in measured["variant"]}
    verdict, parts = _per_variant(table, "l1", bounds, 3)
    threshold = Claim(
        *CLAIM_TEXT["sparsity_target"], f"< {L1_TARGET}",
        f"{measured['l1_mean'].min():.3f}–{measured['l1_mean'].max():.3f} (variant means)" if len(measured) else "—",
        verdict, _explain(parts) + " (L1 = ‖f‖₁/k, per-feature mean activation on the normalised scale)",
        paper_low=0.0, paper_high=L1_TARGET)
    stated = {v: p for v, p in PAPER_TABLE1.items() if np.isfinite(p.l1)}
    verdict, parts = _per_variant(table, "l1", {v: (p.l1 - p.l1_std, p.l1 + p.l1_std) for v, p in stated.items()}, 3)
    paper_text = {v: fmt(p.l1, p.l1_std, 2) for v, p in stated.items()}
    claim, source = CLAIM_TEXT["sparsity_values"]
    values = Claim(claim.format(values=", ".join(f"{paper_text[v]} ({v})" for v in stated)), source,
                   ", ".join(f"{v} {t}" for v, t in paper_text.items()), ", ".join(f"{v} {o}" for v, o, _ in parts),
                   verdict, _explain(parts, paper_text))
    return [threshold, values]


def _u_claim(table: pd.DataFrame, probes: pd.DataFrame) -> Claim:
    measured = table[table["runs"] > 0]
    n_test = int(probes["test_tokens"].min()) if len(probes) else 0
    noise = u_noise(n_test, float(probes["chance"].iloc[0])) if len(probes) else _NA
    verdict, parts = _per_variant(table, "U", {v: (U_REPORTED, U_REPORTED + noise) for v in measured["variant"]}, 2)
    return Claim(
        *CLAIM_TEXT["U"], f"{U_REPORTED:.1f}",
        f"{measured['U_mean'].min():.2f}–{measured['U_mean'].max():.2f} (variant means)" if len(probes) else "—",
        verdict, _explain(parts) + f" (0 is widened to [0, {noise:.2f}], two standard errors of U on "
                                   f"{n_test} held-out tokens)",
        paper_low=U_REPORTED, paper_high=U_REPORTED + noise)


def _ablation_claim(ablations: pd.DataFrame, name: str, text: str, variant: str) -> Claim:
    paper = PAPER_ABLATIONS[name]
    low, high = paper.mean - paper.std, paper.mean + paper.std
    rows = ablations[ablations["ablation"] == name].set_index("variant")
    found = variant in rows.index
    mean = float(rows.at[variant, "mean"]) if found else _NA
    std = float(rows.at[variant, "std"]) if found else _NA
    verdict = interval_verdict(mean, std, low, high)
    signed = low < 0  # a change either way, as "±2%": show its sign
    ours = fmt(mean, std, 1 if paper.percent else 3, paper.percent, signed)
    if not found:
        reason = f"{variant} was not trained or has no such quantity"
    else:
        paper_band = f"[{fmt(low, digits=1 if paper.percent else 2, percent=paper.percent)}, " \
                     f"{fmt(high, digits=1 if paper.percent else 2, percent=paper.percent)}]"
        reason = f"{variant} ({int(rows.at[variant, 'runs'])} runs) {ours} " \
                 f"{'overlaps' if verdict == HOLDS else 'lies outside'} the paper's {paper_band}"
        if np.isfinite(rows.at[variant, "start"]):
            reason += f"; it starts at {rows.at[variant, 'start']:.3f}"
        others = rows.drop(index=variant)["mean"].dropna()
        if len(others):
            spec = dict(digits=1 if paper.percent else 3, percent=paper.percent)
            reason += f"; other variants {fmt(others.min(), **spec)}–{fmt(others.max(), **spec)}"
    return Claim(text, f"§6.3, on {paper.scope}", paper.text, f"{variant} {ours}", verdict, reason,
                 mean, std, low, high)


def claims(tables: RunTables, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim of the paper: its value, ours, the verdict (module docstring) and a one-line reason."""
    table = table1(tables) if table is None else table
    rows = [*_mse_claims(table), *_sparsity_claims(table), _u_claim(table, tables.probes)]
    rows += [_ablation_claim(tables.ablations, name, text, variant) for name, (text, variant) in ABLATION_CLAIMS.items()]
    return pd.DataFrame(rows, columns=Claim._fields)


def claims_markdown(df: pd.DataFrame) -> str:
    show = df[["claim", "source", "paper", "ours", "verdict", "reason"]].assign(verdict=df["verdict"].map("**{}**".format))
    return markdown_table(show) + (
        "\nVerdicts are computed from the numbers (`posae.report.claims`): **holds** when our mean ± std (over seeds and "
        "layers) overlaps the paper's interval (its mean ± std, the bound, or 0 widened by the probe's noise), for "
        "every variant the claim covers; **differs** when it does not for at least one; **cannot be compared** "
        "where the paper's scale is unstated or we have no measurement.\n")
