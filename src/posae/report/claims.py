"""The verdicts on the paper's claims (claims.csv), computed from the numbers, never written by hand.

The paper's side of each claim is `posae.paper`; ours is Table 1 (`posae.report.tables.table1`) and
the ablations of notebook 05. Each row names the test that decided it (`test`):

- **An interval or a bound** (MSE ratios, sparsity, the ablations): the 95% confidence interval of our
  mean over runs (mean ± t·std/√runs, Student's t with runs − 1 degrees of freedom; a single run is
  its point) is compared with the paper's interval (its mean ± std; for a bound the half-line, cut at
  0 for a non-negative quantity). **holds** when they overlap, **differs** when they do not (a claim over
  several variants: holds when it holds for each variant that can be compared). The runs pool layers,
  whose differences widen the interval: per-layer numbers are in table1_by_layer.md.
- **"U = 0"**: judged on U_x (`posae.eval.probes`), not on U with the SAE's position input kept, which an
  SAE echoing its input passes. Per run, D_x (the unclipped score) minus the same score with the
  position labels permuted within each sequence (the null); per variant, a one-sided t-test over its
  runs that this difference is > 0, at 5% with a Bonferroni correction for the number of variants
  tested. **differs** when some variant is significantly above its null, **holds** when none is.
- **cannot be judged at this budget**: a learned table's value the run could not reach. AdamW moves a
  logit by about lr per step at most, so a gate (mask) starting at σ(s) can end anywhere in
  [σ(s − B), σ(s + B)] with B = Σ_t lr_t (`posae.train.lr_budget`) and nowhere else; when the paper's
  interval lies outside that range, agreeing or not says nothing about the architecture.
- **cannot be compared**: the paper's quantity has no stated scale (its MSE values: docs/decisions.md
  §9 compares their ratios and ordering instead), or we have no measurement (the variant was not trained).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from posae.paper import ABLATION_CLAIMS, CLAIM_TEXT, L1_TARGET, MSE_RANGE, PAPER_ABLATIONS, PAPER_TABLE1, U_REPORTED
from posae.report.tables import BASELINE, RunTables, fmt, markdown_table, paper_ratio, table1

HOLDS, DIFFERS, CANNOT, BUDGET = "holds", "differs", "cannot be compared", "cannot be judged at this budget"
VERDICTS = (HOLDS, DIFFERS, CANNOT, BUDGET)
_NA = math.nan


# --------------------------------------------------------------------------- verdicts (pure)


def confidence_interval(mean: float, std: float, runs: int, level: float = 0.95) -> tuple[float, float]:
    """mean ± t·std/√runs (Student's t, runs − 1 degrees of freedom); a single run (or no std) is its point."""
    if not np.isfinite(std) or runs < 2:
        return mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, runs - 1)) * std / math.sqrt(runs)
    return mean - half, mean + half


def interval_verdict(mean: float, std: float, runs: int, low: float, high: float) -> str:
    """holds when the 95% confidence interval of the mean over `runs` overlaps [low, high]; differs when
    not; cannot be compared without a measurement."""
    if not np.isfinite(mean):
        return CANNOT
    lo, hi = confidence_interval(mean, std, runs)
    return HOLDS if lo <= high and hi >= low else DIFFERS


CI_TEST = "95% CI of our mean over runs (t) overlaps the paper's interval"


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


def above_null(differences: np.ndarray, tests: int, alpha: float = 0.05) -> tuple[float, float, bool]:
    """One-sided t-test over runs that the mean of `differences` (score − its null, per run) is > 0.

    Returns (t, p, significant at `alpha` with a Bonferroni correction for `tests` variants). Fewer
    than two runs, or no spread, cannot be tested: (nan, nan, False).
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2 or d.std(ddof=1) == 0:
        return _NA, _NA, False
    t = float(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))
    p = float(stats.t.sf(t, len(d) - 1))
    return t, p, p < alpha / max(tests, 1)


# --------------------------------------------------------------------------- claims


class Claim(NamedTuple):
    claim: str
    source: str
    paper: str
    ours: str
    verdict: str
    reason: str
    test: str = ""
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
        runs = int(rows.at[v, "runs"]) if v in rows.index else 0
        out.append((v, fmt(mean, std, digits, percent), interval_verdict(mean, std, runs, low, high)))
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
        test="none: the paper's scale is unstated", paper_low=low, paper_high=high)

    ratios = {v: paper_ratio(v) for v in PAPER_TABLE1 if v != BASELINE}
    bounds = {v: (r - s, r + s) for v, (r, s) in ratios.items()}
    verdict, parts = _per_variant(table, "mse_ratio", bounds, 2)
    paper_text = {v: fmt(r, s, 2) for v, (r, s) in ratios.items()}
    ratio_claim = Claim(
        *CLAIM_TEXT["mse_ratio"],
        ", ".join(f"{v} {r:.2f}" for v, (r, _) in ratios.items()),
        ", ".join(f"{v} {o}" for v, o, _ in parts), verdict,
        _explain(parts, paper_text) + " (ours: paired by layer and seed)", test=CI_TEST)

    ours_mse = dict(zip(table["variant"], table["mse_mean"]))
    verdict = extremes_verdict(ours_mse, paper_mse)
    common = [v for v in paper_mse if np.isfinite(ours_mse.get(v, _NA))]
    order = " < ".join(sorted(common, key=ours_mse.get))
    lowest, highest = min(paper_mse, key=paper_mse.get), max(paper_mse, key=paper_mse.get)
    claim, source = CLAIM_TEXT["mse_order"]
    order_claim = Claim(
        claim.format(lowest=lowest, highest=highest), source,
        " < ".join(sorted(paper_mse, key=paper_mse.get)), order or "—", verdict,
        f"ours, by mean MSE: {order}" if common else "no variant of the paper's tables was measured",
        test="the paper's lowest and highest variant are ours too (means)")
    return [range_claim, ratio_claim, order_claim]


def _sparsity_claims(table: pd.DataFrame) -> list[Claim]:
    measured = table[table["runs"] > 0]
    bounds = {v: (0.0, L1_TARGET) for v in measured["variant"]}
    verdict, parts = _per_variant(table, "l1", bounds, 3)
    threshold = Claim(
        *CLAIM_TEXT["sparsity_target"], f"< {L1_TARGET}",
        f"{measured['l1_mean'].min():.3f}–{measured['l1_mean'].max():.3f} (variant means)" if len(measured) else "—",
        verdict, _explain(parts) + " (L1 = ‖f‖₁/k, per-feature mean activation on the normalised scale)",
        test=CI_TEST.replace("interval", "bound"), paper_low=0.0, paper_high=L1_TARGET)
    stated = {v: p for v, p in PAPER_TABLE1.items() if np.isfinite(p.l1)}
    verdict, parts = _per_variant(table, "l1", {v: (p.l1 - p.l1_std, p.l1 + p.l1_std) for v, p in stated.items()}, 3)
    paper_text = {v: fmt(p.l1, p.l1_std, 2) for v, p in stated.items()}
    claim, source = CLAIM_TEXT["sparsity_values"]
    values = Claim(claim.format(values=", ".join(f"{paper_text[v]} ({v})" for v in stated)), source,
                   ", ".join(f"{v} {t}" for v, t in paper_text.items()), ", ".join(f"{v} {o}" for v, o, _ in parts),
                   verdict, _explain(parts, paper_text), test=CI_TEST)
    return [threshold, values]


def u_tests(probes: pd.DataFrame) -> pd.DataFrame:
    """Per variant: U_x and U (input kept) mean ± se over runs, D_x − null, and the one-sided test against the null.

    Columns: variant, runs, U_x_mean, U_x_se, U_mean, U_se, excess_mean, excess_se, t, p, significant
    (Bonferroni over the variants in `probes`).
    """
    if probes.empty:
        return pd.DataFrame(columns=["variant", "runs", "U_x_mean", "U_x_se", "U_mean", "U_se", "excess_mean",
                                     "excess_se", "t", "p", "significant"])
    tests = probes["variant"].nunique()
    rows = []
    for v, g in probes.groupby("variant", sort=False):
        excess = (g["D_x"] - g["D_x_null"]).to_numpy()
        t, p, significant = above_null(excess, tests)
        se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else _NA  # noqa: E731
        rows.append({"variant": v, "runs": len(g), "U_x_mean": g["U_x"].mean(), "U_x_se": se(g["U_x"]),
                     "U_mean": g["U"].mean(), "U_se": se(g["U"]), "excess_mean": float(excess.mean()),
                     "excess_se": se(excess), "t": t, "p": p, "significant": significant})
    return pd.DataFrame(rows)


def _u_claim(table: pd.DataFrame, probes: pd.DataFrame) -> Claim:
    measured = set(table.loc[table["runs"] > 0, "variant"])
    tests = u_tests(probes[probes["variant"].isin(measured)]) if len(probes) else u_tests(probes)
    test = ("one-sided t-test over runs of U_x's unclipped score minus its null (position labels permuted within "
            f"sequences), 5% with Bonferroni over {len(tests)} variants")
    if tests.empty:
        return Claim(*CLAIM_TEXT["U"], f"{U_REPORTED:.1f}", "—", CANNOT, "no run was probed", test=test)
    above = tests[tests["significant"]]
    verdict = DIFFERS if len(above) else HOLDS
    fmt_u = lambda r: f"{r.variant} {fmt(r.U_x_mean, r.U_x_se, 3)} (p = {r.p:.2g})"  # noqa: E731
    kept = tests[tests["U_mean"] > tests["U_x_mean"] + 0.05]
    reason = (("above the null: " + "; ".join(fmt_u(r) for r in above.itertuples())) if len(above)
              else f"no variant above its null (smallest p = {tests['p'].min():.2g}, threshold {0.05 / len(tests):.2g})")
    if len(kept):
        reason += ("; with the SAE's own position fed (U, input kept): " +
                   ", ".join(f"{r.variant} {fmt(r.U_mean, r.U_se, 2)}" for r in kept.itertuples()) +
                   ", read from the position input rather than from the activation")
    return Claim(
        *CLAIM_TEXT["U"], f"{U_REPORTED:.1f}",
        f"U_x {tests['U_x_mean'].min():.3f}–{tests['U_x_mean'].max():.3f} (variant means; U, input kept: "
        f"{tests['U_mean'].min():.2f}–{tests['U_mean'].max():.2f})",
        verdict, reason + " (mean ± se over runs)", test=test, paper_low=U_REPORTED, paper_high=U_REPORTED)


def _fidelity_claim(table: pd.DataFrame) -> Claim:
    measured = table[(table["runs"] > 0) & table["ce_score_mean"].notna()]
    ours = (f"CE score {measured['ce_score_mean'].min():.3f}–{measured['ce_score_mean'].max():.3f}, KL "
            f"{measured['kl_mean'].min():.3f}–{measured['kl_mean'].max():.3f} (variant means)") if len(measured) else "—"
    return Claim("reconstructions preserve the model's next-token prediction", "not reported by the paper", "—", ours,
                 CANNOT, "the paper reports no downstream metric; ours is in Table 1 for reading",
                 test="none: nothing to compare with")


def reachable(start: float, budget: float) -> tuple[float, float]:
    """The range of a mean σ(logit) that starts at `start` when no logit can move further than `budget`:
    [σ(σ⁻¹(start) − budget), σ(σ⁻¹(start) + budget)] (the table starts uniform; NaN when either is unknown)."""
    if not (np.isfinite(start) and np.isfinite(budget) and 0.0 < start < 1.0):
        return _NA, _NA
    logit = math.log(start / (1.0 - start))
    return 1.0 / (1.0 + math.exp(budget - logit)), 1.0 / (1.0 + math.exp(-logit - budget))


def _ablation_claim(ablations: pd.DataFrame, name: str, text: str, variant: str) -> Claim:
    paper = PAPER_ABLATIONS[name]
    low, high = paper.mean - paper.std, paper.mean + paper.std
    rows = ablations[ablations["ablation"] == name].set_index("variant")
    found = variant in rows.index
    mean = float(rows.at[variant, "mean"]) if found else _NA
    std = float(rows.at[variant, "std"]) if found else _NA
    runs = int(rows.at[variant, "runs"]) if found else 0
    verdict = interval_verdict(mean, std, runs, low, high)
    start = float(rows.at[variant, "start"]) if found and "start" in rows else _NA
    budget = float(rows.at[variant, "budget"]) if found and "budget" in rows else _NA
    lo_reach, hi_reach = reachable(start, budget)
    out_of_reach = np.isfinite(lo_reach) and (high < lo_reach or low > hi_reach)
    signed = low < 0  # a change either way, as "±2%": show its sign
    ours = fmt(mean, std, 1 if paper.percent else 3, paper.percent, signed)
    if not found:
        reason = f"{variant} was not trained or has no such quantity"
    else:
        paper_band = f"[{fmt(low, digits=1 if paper.percent else 2, percent=paper.percent)}, " \
                     f"{fmt(high, digits=1 if paper.percent else 2, percent=paper.percent)}]"
        ci = confidence_interval(mean, std, runs)
        spec = dict(digits=1 if paper.percent else 3, percent=paper.percent)
        reason = f"{variant} ({runs} runs) {ours}, 95% CI [{fmt(ci[0], **spec)}, {fmt(ci[1], **spec)}], " \
                 f"{'overlaps' if verdict == HOLDS else 'lies outside'} the paper's {paper_band}"
        if np.isfinite(start):
            reason += f"; it starts at {start:.3f}"
        if out_of_reach:
            moved = float(rows.at[variant, "moved"]) if "moved" in rows else _NA
            verdict = BUDGET
            reason = (f"{variant} ({runs} runs) {ours} from a start of {start:.3f}: with Σ lr_t = {budget:.3f} no logit "
                      f"can move further, so the mean can only reach [{lo_reach:.3f}, {hi_reach:.3f}], outside the "
                      f"paper's {paper_band}" + (f" (the largest logit change was {moved:.3f})" if np.isfinite(moved) else ""))
        others = rows.drop(index=variant)["mean"].dropna()
        if len(others) == 1:
            reason += f"; {others.index[0]} {fmt(others.iloc[0], **spec)}"
        elif len(others):
            reason += f"; other variants {fmt(others.min(), **spec)}–{fmt(others.max(), **spec)}"
    test = CI_TEST if verdict != BUDGET else "reach: the paper's interval against σ(start ± Σ lr_t)"
    return Claim(text, f"§6.3, on {paper.scope}", paper.text, f"{variant} {ours}", verdict, reason, test,
                 mean, std, low, high)


def claims(tables: RunTables, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim of the paper: its value, ours, the verdict (module docstring) and a one-line reason."""
    table = table1(tables) if table is None else table
    rows = [*_mse_claims(table), *_sparsity_claims(table), _u_claim(table, tables.probes)]
    rows += [_ablation_claim(tables.ablations, name, text, variant) for name, (text, variant) in ABLATION_CLAIMS.items()]
    rows.append(_fidelity_claim(table))
    return pd.DataFrame(rows, columns=Claim._fields)


def claims_markdown(df: pd.DataFrame) -> str:
    show = df[["claim", "source", "paper", "ours", "verdict", "reason", "test"]].assign(
        verdict=df["verdict"].map("**{}**".format))
    return markdown_table(show) + (
        "\nVerdicts are computed from the numbers (`posae.report.claims`), each by the test its row names: an interval "
        "claim **holds** when the 95% confidence interval of our mean over runs overlaps the paper's interval (its "
        "mean ± std, or the bound), for every variant the claim covers, and **differs** when it does not for at least "
        "one; \"U = 0\" **differs** when some variant's U_x is above its null (one-sided t-test over runs, Bonferroni "
        "over the variants) and **holds** when none is; **cannot be judged at this budget** where the paper's value "
        "lies beyond what the run's learning-rate budget lets a learned table reach; **cannot be compared** where the "
        "paper's scale is unstated, it reports nothing, or we have no measurement.\n")
