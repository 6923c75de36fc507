"""Training curves as PNG plots: one panel per kind of metric, train batches and eval points apart, axes labelled
with their units."""

from __future__ import annotations

import io
import math

from medgpt.report.labels import NO_SPLIT, PANELS, metric_label, x_label, y_label


def curves(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """The plottable series of a metrics log: panel -> curve name -> (steps, values)."""
    panels: dict[str, dict[str, tuple[list, list]]] = {}
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if (found := metric_label(key)) is None:
                continue
            xs, ys = panels.setdefault(found[0], {}).setdefault(found[1], ([], []))
            xs.append(step)
            ys.append(value)
    return panels


def curve_figure(rows: list[dict], title: str, stage: str | None = None, settings: dict | None = None):
    """A matplotlib figure with one titled, labelled panel per kind of curve in the log; None when the log
    holds nothing worth plotting (only the optimizer's own learning rate or gradient norm)."""
    panels = curves(rows)
    if not set(panels) - NO_SPLIT:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [name for name in PANELS if name in panels]
    columns = min(3, len(names))
    lines = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.7 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, (xs, ys) in sorted(panels[name].items(), key=lambda item: ("(eval)" in item[0], item[0])):
            evaluated = label.endswith("(eval)")
            ax.plot(xs, ys, marker=("s" if evaluated else "o") if len(xs) < 30 else None,
                    markersize=6 if evaluated else 3, linestyle="--" if evaluated else "-", label=label)
        ax.set_title(PANELS[name][0], fontsize=11)
        ax.set_xlabel(x_label(stage))
        ax.set_ylabel(y_label(name, stage, settings))
        steps = sorted({x for xs, _ in panels[name].values() for x in xs})
        if len(steps) <= 12:
            ax.set_xticks(steps)  # few logged steps: exactly those (a locator invents fractional ones)
            if len(steps) == 1:
                ax.set_xlim(steps[0] - 1, steps[0] + 1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], title: str, stage: str | None = None, settings: dict | None = None) -> bytes | None:
    """`curve_figure` as PNG bytes."""
    fig = curve_figure(rows, title, stage, settings)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
