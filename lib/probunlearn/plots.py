"""Figures that more than one notebook or section draws (notebooks 03, 04, 05 and 07), so that all show the same thing.

- `forget_utility_tradeoff`: [P2]'s forgetting vs utility scatter, read as SPEC §4 says forget scores
  must be read: against the retain model (which never saw the forget facts), not "lower is better".
- `claim_figure`: [P1]'s first claim where it applies (SPEC §6.1): greedy against sampled leakage per
  model, and P(leak within n | greedy clean) beside the retain model and the partial-knowledge control.
- `variant_bars`: one metric per variant with its 95 % interval, a group of bars per base method
  (notebook 04's regime test and its two-phase run).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

VARIANT_MARKERS = {"uncontrolled": "X", "early stopped": "s", "mixed": "o"}
FORGET_LABEL = "forget ROUGE-L:\ncloser to the retain model's line = forgotten"
RETAIN_LABEL = "retain ROUGE-L (→ utility kept)"
DAMAGE_LABEL = "damage, not forgetting"


def _reference(table: pd.DataFrame, method: str, column: str) -> float | None:
    rows = table[(table["method"] == method) & (table["variant"] == "reference")] if "variant" in table else table[:0]
    return None if rows.empty or pd.isna(rows[column].iloc[0]) else float(rows[column].iloc[0])


def _interval(row, column: str):
    low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    return [[row[column] - low], [high - row[column]]]


def variant_bars(ax, table: pd.DataFrame, column: str, order, *, colours, by: str = "method", rotation: float = 25):
    """Bars of `column` for each variant in `order` (rows of `table`, notebook 04's `variant_table`),
    with their 95 % intervals (`<column>_low` / `_high`) as error bars, one group of bars per value of
    `by` side by side (later groups paler, labelled where there is more than one); `colours`: one per
    variant in `order`."""
    groups = list(dict.fromkeys(table[by]))
    width = 0.8 / len(groups)
    for k, group in enumerate(groups):
        rows = table[table[by] == group].set_index("variant").loc[list(order)]
        ax.bar(np.arange(len(order)) + (k - (len(groups) - 1) / 2) * width, rows[column], width, capsize=3,
               yerr=[rows[column] - rows[column + "_low"], rows[column + "_high"] - rows[column]],
               color=colours, alpha=1 - 0.4 * k, label=group if len(groups) > 1 else None)
    ax.set(xticks=range(len(order)))
    ax.set_xticklabels(order, rotation=rotation, ha="right", fontsize=8)


def forget_utility_tradeoff(ax, table: pd.DataFrame, *, bar: float, retain_forget: float | None = None,
                            retain_retain: float | None = None, target: tuple[float, float] | None = None,
                            forget: str = "forget_rouge_l_recall", retain: str = "retain_rouge_l_recall",
                            legend: bool = True):
    """Forgetting vs utility ([P2]) on `ax`: one point per (method, variant) row of `table` (notebook
    03's `matched_utility` table: columns method, variant, `forget` and `retain` with optional `_low` /
    `_high` intervals, drawn as error bars), colour per method, marker per variant.

    Read as SPEC §4 says: the ideal is the retain model, so its forget score is a horizontal line
    (`retain_forget`; default: the table's "retain model" reference row) and the region below it is
    shaded "damage, not forgetting"; the utility `bar` is a vertical line; the retain model is a star
    at (`retain_retain`, `retain_forget`) when its retain score is known. The `target` (x = retain,
    y = forget; default: the table's "target" row) is drawn last with a large hollow marker and a
    label, so that a model mixed back to λ = 1 does not hide it. Reference rows (variant
    "reference") are drawn only as these references. Returns `ax`."""
    retain_forget = _reference(table, "retain model", forget) if retain_forget is None else float(retain_forget)
    if retain_forget is None:
        raise ValueError("no retain model forget score: pass retain_forget= or a table with a 'retain model' "
                         "reference row (notebook 03's matched_utility table has one)")
    if retain_retain is None:
        retain_retain = _reference(table, "retain model", retain)
    if target is None and _reference(table, "target", forget) is not None:
        target = (_reference(table, "target", retain), _reference(table, "target", forget))
    models = table[table["variant"] != "reference"] if "variant" in table else table

    ax.axhspan(-1.0, retain_forget, color="C3", alpha=0.08, lw=0, zorder=0, gid="damage_region")
    ax.axhline(retain_forget, color="black", ls=":", lw=1.2, gid="retain_forget",
               label=f"retain model's forget score ({retain_forget:.2f})")
    ax.axvline(bar, color="grey", ls="--", lw=1, gid="utility_bar", label=f"utility bar ({bar:.2f})")
    colours = {method: f"C{i % 10}" for i, method in enumerate(dict.fromkeys(models["method"]))}
    for _, row in models.iterrows():
        ax.errorbar(row[retain], row[forget], xerr=_interval(row, retain), yerr=_interval(row, forget),
                    marker=VARIANT_MARKERS.get(row["variant"], "o"), color=colours[row["method"]], ms=7,
                    capsize=2, lw=0.8, ls="none", alpha=0.9, zorder=3)
    if retain_retain is not None:
        ax.plot(retain_retain, retain_forget, marker="*", color="black", ms=14, ls="none", zorder=5, gid="retain_model")
    values = [*models[forget].dropna(), retain_forget, *([target[1]] if target else [])]
    ax.set_ylim(min(-0.03, min(values) - 0.03), max(1.03, max(values) + 0.03))
    low = ax.get_ylim()[0]
    if retain_forget - low > 0.08:  # room for the label inside the shaded region
        ax.text(0.02, (low + retain_forget) / 2, DAMAGE_LABEL, transform=ax.get_yaxis_transform(), color="C3",
                fontsize=9, va="center", ha="left", style="italic", gid="damage_label")
    else:
        ax.annotate(DAMAGE_LABEL, (0.02, retain_forget), xycoords=ax.get_yaxis_transform(), xytext=(0, -10),
                    textcoords="offset points", color="C3", fontsize=9, style="italic", gid="damage_label")
    if target is not None and not any(v is None or math.isnan(v) for v in target):
        ax.plot(*target, marker="D", ms=14, mfc="none", mec="black", mew=2, ls="none", zorder=10, gid="target")
        ax.annotate("target", target, xytext=(-26, 0), textcoords="offset points", ha="right", va="center", fontsize=9,
                    fontweight="bold", zorder=10, arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.8})
    ax.set(xlabel=RETAIN_LABEL, ylabel=FORGET_LABEL)
    if legend:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [Line2D([], [], color=c, marker="o", ls="none", label=m) for m, c in colours.items()]
        handles += [Line2D([], [], color="grey", marker=mk, ls="none", label=v) for v, mk in VARIANT_MARKERS.items()
                    if v in set(models["variant"])]
        handles += [Line2D([], [], color="black", ls=":", marker="*" if retain_retain is not None else None, ms=9,
                           label="retain model (never saw the forget facts)"),
                    Line2D([], [], color="grey", ls="--", label=f"utility bar ({bar:.2f})"),
                    Patch(color="C3", alpha=0.15, label=DAMAGE_LABEL)]
        if target is not None:
            handles.append(Line2D([], [], marker="D", mfc="none", mec="black", mew=2, ls="none", ms=9, label="target"))
        ax.legend(handles=handles, fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return ax


def claim_figure(axes, claim: pd.DataFrame, *, control: str | None = None, title: str = "greedy vs sampled leakage"):
    """Two panels on `axes` from a `probabilistic.claim_table`: left, per model, the share of forget
    questions whose greedy answer leaks against the share that leak within n samples (with the
    diagonal, where sampling finds nothing greedy misses); right, P(leak within n | greedy clean) per
    model, with the retain model's (guessing: dashed) and the `control` model's (partial knowledge:
    dotted) as reference lines. Intervals from the `_low` / `_high` columns."""
    colours = {"retain": "k", "target": "C3", **({control: "C1"} if control else {})}
    for _, r in claim.iterrows():
        axes[0].errorbar(r["greedy_leak"], r["leaks_within_n"], xerr=_interval(r, "greedy_leak"),
                         yerr=_interval(r, "leaks_within_n"), fmt="o", color=colours.get(r["model"], "C0"), ms=5,
                         capsize=2, lw=0.7)
        axes[0].annotate(r["model"], (r["greedy_leak"], r["leaks_within_n"]), fontsize=6, xytext=(3, -8),
                         textcoords="offset points")
    axes[0].plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="sampling finds nothing greedy misses")
    axes[0].set(xlabel="share of forget questions whose greedy answer leaks", ylabel="share that leak within n samples",
                xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), title=title)
    axes[0].legend(fontsize=7, loc="lower right")
    shown = claim.dropna(subset=["leak_given_clean"])
    x = np.arange(len(shown))
    errors = [shown["leak_given_clean"] - shown["leak_given_clean_low"], shown["leak_given_clean_high"] - shown["leak_given_clean"]]
    axes[1].bar(x, shown["leak_given_clean"], yerr=errors, capsize=2, color=[colours.get(m, "C0") for m in shown["model"]])
    for reference, style in (("retain", "--"), (control, ":")):
        if reference in set(shown["model"]):
            axes[1].axhline(shown.set_index("model").loc[reference, "leak_given_clean"], color=colours[reference], ls=style,
                            lw=1, label=f"{reference} ({'guessing' if reference == 'retain' else 'partial knowledge'})")
    axes[1].set(ylim=(0, 1.03), ylabel="P(leak within n | greedy clean)",
                title="greedily clean questions that leak when sampled")
    axes[1].set_xticks(x, shown["model"], rotation=40, ha="right", fontsize=7)
    if len(axes[1].get_lines()):
        axes[1].legend(fontsize=7)

