"""The figures notebooks share: the forgetting-vs-utility plot read against the retain model (03, 07), and the
bars of notebook 04's variants with their intervals."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from probunlearn.plots import forget_utility_tradeoff, variant_bars


def matched_table():
    """A small matched_utility table: two references, two methods in three variants, a mixed model at λ = 1
    sitting exactly on the target."""
    rows = [("retain model", "reference", 0.6, 0.95), ("target", "reference", 1.0, 1.0),
            ("ga", "uncontrolled", 0.1, 0.2), ("ga", "early stopped", 0.5, 0.92), ("ga", "mixed", 1.0, 1.0),
            ("npo", "uncontrolled", 0.3, 0.5), ("npo", "early stopped", 0.65, 0.93), ("npo", "mixed", 0.7, 0.94)]
    table = pd.DataFrame(rows, columns=["method", "variant", "forget_rouge_l_recall", "retain_rouge_l_recall"])
    for column in ("forget_rouge_l_recall", "retain_rouge_l_recall"):
        controlled = table["variant"] != "reference"
        table[f"{column}_low"] = table[column].where(~controlled) - 0.05 * controlled
        table[f"{column}_high"] = table[column].where(~controlled) + 0.05 * controlled
        table.loc[~controlled, [f"{column}_low", f"{column}_high"]] = float("nan")
    return table


def by_gid(ax, gid):
    found = [a for a in [*ax.lines, *ax.texts, *ax.patches, *ax.collections] if a.get_gid() == gid]
    assert found, f"nothing drawn with gid {gid!r}"
    return found[0]


def test_tradeoff_draws_the_retain_model_line_the_bar_the_damage_region_and_the_target():
    fig, ax = plt.subplots()
    forget_utility_tradeoff(ax, matched_table(), bar=0.9)
    retain_line = by_gid(ax, "retain_forget")
    assert set(retain_line.get_ydata()) == {0.6}  # horizontal, at the retain model's forget score
    bar_line = by_gid(ax, "utility_bar")
    assert set(bar_line.get_xdata()) == {0.9}  # vertical, at the bar
    damage = by_gid(ax, "damage_label")
    assert "damage, not forgetting" in damage.get_text()
    shaded = by_gid(ax, "damage_region")  # the region below the retain model's line
    data_box = shaded.get_path().get_extents(shaded.get_patch_transform())  # y in data coordinates
    assert data_box.y1 == pytest.approx(0.6) and data_box.y0 < ax.get_ylim()[0]
    target = by_gid(ax, "target")
    assert list(target.get_xdata()) == [1.0] and list(target.get_ydata()) == [1.0]
    assert target.get_zorder() >= max(a.get_zorder() for a in ax.lines if a is not target)  # drawn on top
    assert target is ax.lines[-1]  # and last
    assert any(t.get_text() == "target" for t in ax.texts)
    star = by_gid(ax, "retain_model")
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([0.95], [0.6])
    assert "closer to the retain model" in ax.get_ylabel() and "forgotten" in ax.get_ylabel()
    assert "utility kept" in ax.get_xlabel()
    assert "down" not in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"ga", "npo", "mixed", "uncontrolled", "target", "damage, not forgetting"} <= set(labels)
    plt.close(fig)


def test_tradeoff_takes_explicit_references_and_fails_without_a_retain_score():
    table = matched_table()
    controlled = table[table["variant"] != "reference"]
    fig, ax = plt.subplots()
    forget_utility_tradeoff(ax, controlled, bar=0.8, retain_forget=0.55, retain_retain=0.9, target=(0.97, 0.99),
                            legend=False)
    assert set(by_gid(ax, "retain_forget").get_ydata()) == {0.55}
    assert list(by_gid(ax, "target").get_ydata()) == [0.99]
    assert ax.get_legend() is None
    with pytest.raises(ValueError, match="retain_forget"):
        forget_utility_tradeoff(ax, controlled, bar=0.8)
    plt.close(fig)


def test_variant_bars_draw_each_variant_in_order_with_its_interval_one_group_per_method():
    table = pd.DataFrame({"method": ["ga", "ga", "npo", "npo"], "variant": ["b", "a", "a", "b"],
                          "m": [0.2, 0.5, 0.4, 0.1], "m_low": [0.1, 0.3, 0.4, 0.0], "m_high": [0.3, 0.9, 0.6, 0.1]})
    fig, ax = plt.subplots()
    variant_bars(ax, table, "m", ["a", "b"], colours=["C0", "C3"], rotation=20)
    bars = ax.patches
    assert [round(b.get_height(), 6) for b in bars] == [0.5, 0.2, 0.4, 0.1]  # ga's a, b, then npo's a, b
    assert [round(b.get_x() + b.get_width() / 2, 6) for b in bars] == [-0.2, 0.8, 0.2, 1.2]  # groups side by side
    assert bars[0].get_alpha() == 1 and bars[2].get_alpha() == pytest.approx(0.6)
    segments = [seg for c in ax.collections for seg in c.get_segments()]
    assert sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segments) == [(0.0, 0.1), (0.1, 0.3), (0.3, 0.9),
                                                                               (0.4, 0.6)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"] and ax.get_xticklabels()[0].get_rotation() == 20
    assert ax.get_legend_handles_labels()[1] == ["ga", "npo"]  # labelled groups where there is more than one
    plt.close(fig)
