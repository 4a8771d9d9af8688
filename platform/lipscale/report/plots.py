"""Figures described once as panels of series, drawn twice: a matplotlib PNG
(for MLflow's artifact view and the README) and a plotly figure for the one
self-contained HTML page (hover names every trial). What to draw is
lipscale.report.figures'; this module only knows how.

matplotlib and plotly are imported when a figure is drawn: `lipscale fit`
draws none.
"""

import html
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import plotly.graph_objects as go

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    style: Literal["points", "line", "marked", "dashed", "step"] = "points"
    """'marked': a line with a marker at each point; 'step': the line holds its value
    until the next x (a Pareto front)."""
    low: Sequence[float] | None = None
    """With `high`: a shaded band around a line, an interval through each point."""
    high: Sequence[float] | None = None
    color: str = PALETTE[0]
    labels: Sequence[str] | None = None
    """One per point, shown on hover in the HTML."""
    legend: bool = True
    """Named in the legend; False for one of many alike lines (30 trials' legend covered the panels),
    which their panel's colour bar and their hover labels tell apart."""


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    logx: bool = False
    logy: bool = False
    note: str | None = None
    """Written at the foot of the panel (clear of the points above it), e.g. why a metric was not fitted."""
    colorbar: tuple[str, Sequence[float]] | None = None
    """(label, values): the series are coloured by these values (`shades`); the PNG draws the scale."""

    @property
    def y_range(self) -> tuple[float, float] | None:
        """What both renderings show of y: every point, line and interval, padded 8%; not the
        bands, which are clipped. A law's bootstrap band reached 7x the data at its smallest size
        (its A's interval runs to 1e14), leaving the points a sliver at the panel's foot."""
        values = [v for s in self.series for v in s.y]
        values += [v for s in self.series if s.style == "points" and s.low is not None for v in (*s.low, *s.high)]
        y = np.asarray(values, dtype=float)
        y = y[np.isfinite(y) & ((y > 0) if self.logy else True)]
        if not len(y):
            return None
        low, high = y.min(), y.max()
        if self.logy:
            pad = (high / low) ** 0.08 if high > low else 1.1
            return low / pad, high * pad
        pad = 0.08 * (high - low) if high > low else 0.1 * max(abs(high), 1.0)
        return low - pad, high + pad


def _scale(values: Sequence[float]):
    """The colour scale of `values`: viridis up to its yellow-green (the last tenth is too pale on
    white), from their lowest (darkest) to their highest, in log space; (colormap, norm)."""
    from matplotlib import colormaps, colors

    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v) & (v > 0)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (1.0, 1.0)
    cmap = colors.ListedColormap(colormaps["viridis"](np.linspace(0, 0.9, 256)))
    return cmap, colors.LogNorm(lo, hi if hi > lo else lo * 10)


def shades(values: Sequence[float]) -> list[str]:
    """A colour per positive value along `_scale`, lowest darkest; grey where a value is NaN."""
    from matplotlib import colors

    cmap, norm = _scale(values)
    return [colors.to_hex(cmap(norm(x))) if np.isfinite(x) and x > 0 else "#999999" for x in values]


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = min(columns, count)
    return math.ceil(count / columns), columns


# --- matplotlib ----------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are built on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def save_png(panels: list[Panel], path: str, *, title: str, columns: int = 3) -> None:
    plt = _pyplot()
    rows, cols = _grid(len(panels), columns)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.5), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel)
        if panel.colorbar and panel.series:
            from matplotlib.cm import ScalarMappable

            label, values = panel.colorbar
            cmap, norm = _scale(values)
            fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw(ax, panel: Panel) -> None:
    for s in panel.series:
        if s.style == "points":
            if s.low is not None:
                # Drawn from low to high, not as +-errors: a percentile interval may leave out its point.
                ax.vlines(s.x, s.low, s.high, color=s.color, lw=1.5)
            ax.plot(s.x, s.y, "o", ms=5, color=s.color, label=s.name if s.legend else None)
            continue
        if s.low is not None:
            ax.fill_between(s.x, s.low, s.high, color=s.color, alpha=0.2, lw=0)
        linestyle = "--" if s.style == "dashed" else "-"
        drawstyle = "steps-post" if s.style == "step" else "default"
        marker = "o" if s.style == "marked" else None
        ax.plot(s.x, s.y, linestyle=linestyle, drawstyle=drawstyle, marker=marker, ms=4, color=s.color,
                label=s.name if s.legend else None)  # fmt: skip
    ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
    ax.title.set_fontsize(10)
    if panel.logx:
        ax.set_xscale("log")
    if panel.logy:
        ax.set_yscale("log")
    if (y_range := panel.y_range) is not None:
        ax.set_ylim(*y_range)
    if panel.note:
        ax.text(0.5, 0.04, "\n".join(textwrap.wrap(panel.note, 48)), transform=ax.transAxes, ha="center",
                va="bottom", fontsize=8, bbox=dict(facecolor="white", edgecolor="0.7"))  # fmt: skip
    if any(s.legend for s in panel.series):
        ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)


def save_table_png(header: list[str], rows: list[list[str]], path: str, *, title: str) -> None:
    """A table as an image, for MLflow's artifact view (the HTML page has it as text)."""
    plt = _pyplot()
    chars = sum(max(len(c) for c in column) for column in zip(header, *rows))
    fig, ax = plt.subplots(figsize=(1 + 0.08 * chars, 0.5 + 0.2 * (len(rows) + 1)))  # ~0.08 in per 8pt character
    ax.axis("off")
    table = ax.table(cellText=rows or [[""] * len(header)], colLabels=header, loc="upper center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# --- plotly --------------------------------------------------------------------------------


def plotly_figure(panels: list[Panel], *, title: str, columns: int = 3) -> "go.Figure":
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(panels), columns)
    fig = make_subplots(rows, cols, subplot_titles=[p.title for p in panels], horizontal_spacing=0.08)
    shown = set()  # one legend entry per name, however many panels repeat it
    for i, panel in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        for s in panel.series:
            for trace in _traces(s):
                shown_here = s.legend and trace.showlegend is not False and s.name not in shown
                trace.update(legendgroup=s.name, showlegend=shown_here)
                fig.add_trace(trace, row=row, col=col)
            shown.add(s.name)
        fig.update_xaxes(title_text=panel.xlabel, type="log" if panel.logx else None, row=row, col=col)
        fig.update_yaxes(title_text=panel.ylabel, type="log" if panel.logy else None, row=row, col=col)
        if (y_range := panel.y_range) is not None:  # plotly takes a log axis's range in log10
            fig.update_yaxes(range=[math.log10(v) for v in y_range] if panel.logy else list(y_range), row=row, col=col)
        if panel.note:
            text = "<br>".join(html.escape(line) for line in textwrap.wrap(panel.note, 48))
            fig.add_annotation(text=text, showarrow=False, row=row, col=col, xref="x domain", yref="y domain",
                               x=0.5, y=0.04, yanchor="bottom", bgcolor="white")  # fmt: skip
    fig.update_layout(title=title, height=380 * rows + 80, template="plotly_white", margin=dict(t=90))
    return fig


def _traces(s: Series) -> list["go.Scatter"]:
    import plotly.graph_objects as go

    x, y = list(map(float, s.x)), list(map(float, s.y))
    text = list(s.labels) if s.labels is not None else None
    if s.style == "points":
        traces = [go.Scatter(x=x, y=y, mode="markers", name=s.name, marker=dict(color=s.color, size=8), text=text,
                             hovertemplate="%{text}<br>x=%{x:.3g}<br>y=%{y:.3g}" if text else None)]  # fmt: skip
        if s.low is not None:
            # Segments from low to high (as in the PNG), separated by None.
            xs = [v for xi in x for v in (xi, xi, None)]
            ys = [v for lo, hi in zip(s.low, s.high) for v in (float(lo), float(hi), None)]
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=s.color), showlegend=False,
                                     hoverinfo="skip"))  # fmt: skip
        return traces
    line = dict(color=s.color, dash="dash" if s.style == "dashed" else None, shape="hv" if s.style == "step" else None)
    mode = "lines+markers" if s.style == "marked" else "lines"
    traces = []
    if s.low is not None:
        # The band: its upper edge, then the lower edge filled up to it.
        traces.append(
            go.Scatter(x=x, y=list(s.high), mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip")
        )
        traces.append(go.Scatter(x=x, y=list(s.low), mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor=_transparent(s.color), showlegend=False, hoverinfo="skip"))  # fmt: skip
    traces.append(go.Scatter(x=x, y=y, mode=mode, name=s.name, line=line, text=text))
    return traces


def _transparent(color: str, alpha: float = 0.2) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)

    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    # Scrolled in its own box: a study's columns (every swept param, every metric) outgrow a page.
    return f"<div class='wide'><table>\n<tr>{cells('th', header)}</tr>\n{body}\n</table></div>"


def html_page(title: str, sections: list[tuple[str, "go.Figure | str"]]) -> str:
    """One self-contained page: plotly.js inline once (it renders offline), links to
    the sections, then each section's figure, or its HTML when given a string."""
    parts, links, inline = [], [], True
    for heading, body in sections:
        if not isinstance(body, str):
            body = body.to_html(full_html=False, include_plotlyjs=inline)
            inline = False
        anchor = "-".join(heading.split())
        links.append(f"<a href='#{anchor}'>{html.escape(heading)}</a>")
        parts.append(f"<h2 id='{anchor}'>{html.escape(heading)}</h2>\n{body}")
    parts.insert(0, f"<p>{' | '.join(links)}</p>")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif;margin:2em} pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
        " .wide{overflow-x:auto;max-width:100%} table{border-collapse:collapse;font-size:13px}"
        " td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}</style>\n"
        f"</head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
