"""The map of word vectors moving: an interactive block for the report page (Bokeh), and its static PNG.

It draws `minilm.analysis.vector_map.build`'s numbers, the dict stored in metrics.json under "map"; the page
carries that same dict as JSON and its one drawing function (JavaScript, `UPDATE` below) reads nothing else,
so the picture and metrics.json cannot disagree (a test reads the block back). Per variant a panel, all on the
same axes (one projection per level, fitted on every state: analysis/projection.py), with

    points      the words at the chosen step, coloured by group; ▲ a bound pair's word, ■ a control's (these
                two kinds labelled; hover names every word)
    links       solid between a bound pair's words, dashed between a control pair's
    trail/arrow each word's path over the kept steps, and an arrow from where it was (base, a grey dot) to
                where it is
    outlines    each group's convex hull
    hover       the word, its nearest probe words and its cosine to its partner, before and after
and controls for the level (static embedding, layer boundaries) and the training step. Beside the panels,
the share of variance the two axes keep and the true cosines of the pairs, at that level and step.

Why Bokeh: the page must open offline, so its library is inlined whole. Measured for such a map (issue 17):
plotly 4.9 MB, Bokeh 1.75 MB, altair 1.04 MB but only through the 84 MB vl-convert-python wheel. Bokeh is the
smallest page that needs no extra binary, has hover, linked axes and widgets with JavaScript callbacks built
in, and writes `<script>` blocks we embed in our own page (report.py stays one hand-written HTML file).
"""

from __future__ import annotations

import json

import numpy as np
from matplotlib.figure import Figure

from minilm.report import PALETTE

GREY = "#9a9a9a"
MARKERS = {"bound": "triangle", "control": "square", "": "circle"}
# Bokeh's own JavaScript, inlined: the plots and the widgets (1.65 MB); not WebGL, tables or MathJax (2.3 MB more).
BOKEH_PARTS = ["bokeh", "bokeh-widgets"]
# The columns UPDATE fills, per source (empty until the page loads).
COLUMNS = {"points": ("x", "y", "word", "label", "colour", "marker", "group", "role", "partner", "nn_before",
                      "nn_after", "cos_before", "cos_after", "self_cos"),
           "trails": ("xs", "ys", "colour"), "arrows": ("x0", "y0", "x1", "y1", "colour"),
           "hulls": ("xs", "ys", "colour"), "bound": ("xs", "ys"), "control": ("xs", "ys")}

# Drawn on load and on every move of a control. Reads D, the map's numbers, from the page's JSON block (parsed
# once). Args: layer, step (the widgets), colours, markers (per word), group_colours, xr, yr (the shared ranges),
# sources {points, trails, arrows, hulls, bound, control} (one of each per variant), info (the numbers below).
UPDATE = """
const D = window.minilmMap || (window.minilmMap = JSON.parse(document.getElementById('minilm-map-data').textContent));
const level = D.levels[layer.active], s = step.value, words = D.words;
step.title = `training step ${D.steps[s]} of ${D.steps[D.steps.length - 1]}`;
const [x0, x1, y0, y1] = D.bounds[level];
xr.start = x0; xr.end = x1; yr.start = y0; yr.end = y1;
const fmt = (c) => (c === null || c === undefined) ? '—' : c.toFixed(3);
const names = (ids) => ids.map((j) => words[j]).join(', ');
const ok = (p) => p[0] !== null && p[1] !== null;
function hull(points) {  // Andrew's monotone chain: the convex hull, counter-clockwise
  const p = points.slice().sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  if (p.length < 3) return p;
  const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
  const half = (pts) => { const h = []; for (const q of pts) {
    while (h.length >= 2 && cross(h[h.length - 2], h[h.length - 1], q) <= 0) h.pop(); h.push(q); } return h; };
  const lower = half(p), upper = half(p.slice().reverse());
  return lower.slice(0, -1).concat(upper.slice(0, -1));
}
D.variants.forEach((v, i) => {
  const path = D.xy[level][v], now = path[s], was = path[0];
  const pc = D.partner_cos[level][v], nb = D.neighbours[level][v], sc = D.self_cos[level][v];
  const keep = words.map((w, k) => k).filter((k) => ok(now[k]));
  const pick = (a) => keep.map((k) => a[k]);
  sources.points[i].data = {x: pick(now.map((p) => p[0])), y: pick(now.map((p) => p[1])), word: pick(words),
    label: pick(words.map((w, k) => D.role[k] ? w : '')),
    colour: pick(colours), marker: pick(markers), group: pick(D.group.map((g) => g || '—')),
    role: pick(D.role.map((r) => r || '—')), partner: pick(D.partner.map((j) => j < 0 ? '—' : words[j])),
    nn_before: pick(nb[0].map(names)), nn_after: pick(nb[s].map(names)), cos_before: pick(pc[0].map(fmt)),
    cos_after: pick(pc[s].map(fmt)), self_cos: pick(sc[s].map(fmt))};
  sources.trails[i].data = {xs: keep.map((k) => path.slice(0, s + 1).map((p) => p[k][0])),
    ys: keep.map((k) => path.slice(0, s + 1).map((p) => p[k][1])), colour: pick(colours)};
  const moved = keep.filter((k) => Math.hypot(now[k][0] - was[k][0], now[k][1] - was[k][1]) > 1e-9);
  sources.arrows[i].data = {x0: moved.map((k) => was[k][0]), y0: moved.map((k) => was[k][1]),
    x1: moved.map((k) => now[k][0]), y1: moved.map((k) => now[k][1]), colour: moved.map((k) => colours[k])};
  const hx = [], hy = [], hc = [];
  D.groups.forEach((g, gi) => {
    const h = hull(keep.filter((k) => D.group[k] === g).map((k) => now[k]));
    if (h.length >= 3) { hx.push(h.map((p) => p[0])); hy.push(h.map((p) => p[1])); hc.push(group_colours[gi]); }
  });
  sources.hulls[i].data = {xs: hx, ys: hy, colour: hc};
  for (const role of ['bound', 'control']) {
    const ks = keep.filter((k) => D.role[k] === role && D.partner[k] > k && ok(now[D.partner[k]]));
    sources[role][i].data = {xs: ks.map((k) => [now[k][0], now[D.partner[k]][0]]),
                             ys: ks.map((k) => [now[k][1], now[D.partner[k]][1]])};
  }
});
const rows = words.map((w, k) => k).filter((k) => D.partner[k] > k);
const head = '<tr><th>pair</th><th>kind</th><th>base</th>' + D.variants.map((v) => `<th>${v}</th>`).join('') + '</tr>';
const body = rows.map((k) => {
  const base = D.partner_cos[level][D.variants[0]][0][k];
  const change = (c) => (c === null || base === null) ? '—' : (c - base >= 0 ? '+' : '') + (c - base).toFixed(3);
  const cells = D.variants.map((v) => {
    const c = D.partner_cos[level][v][s][k];
    return `<td>${fmt(c)} (${change(c)})</td>`;
  });
  return `<tr><td>${words[k]}–${words[D.partner[k]]}</td><td>${D.role[k]}</td><td>${fmt(base)}</td>` +
    `${cells.join('')}</tr>`;
}).join('');
const share = (100 * D.variance_share[level]).toFixed(1);
info.text = `<p><b>${level}</b>, step ${D.steps[s]}: the two axes keep <b>${share}%</b> of the variance of` +
  ` the base and every tuned state at this level (one projection for all of them, so a move on the map is a` +
  ` move of the vector, flattened). The true cosines, in all ${D.dimensions} dimensions:</p>` +
  `<table><tr><th colspan="${3 + D.variants.length}">cosine of each pair (change from the base)</th></tr>` +
  `${head}${body}</table>`;
"""


def _colours(data: dict) -> tuple[list[str], list[str]]:
    group_colours = [PALETTE[i % len(PALETTE)] for i in range(len(data["groups"]))]
    by_group = dict(zip(data["groups"], group_colours))
    return [by_group.get(g, GREY) for g in data["group"]], group_colours


def map_block(data: dict, *, panel_width: int = 520, panel_height: int = 420) -> str:
    """HTML for the report page: the map's numbers as JSON, Bokeh's JavaScript inlined, the panels and controls."""
    from bokeh.document import Document
    from bokeh.embed import components
    from bokeh.events import DocumentReady
    from bokeh.layouts import column, gridplot
    from bokeh.models import (Arrow, ColumnDataSource, CustomJS, Div, HoverTool, NormalHead, RadioButtonGroup,
                              Range1d, Slider)
    from bokeh.plotting import figure
    from bokeh.resources import Resources

    colours, group_colours = _colours(data)
    xr, yr = Range1d(0, 1), Range1d(0, 1)  # shared by every panel; UPDATE sets them per level
    sources = {k: [] for k in ("points", "trails", "arrows", "hulls", "bound", "control")}
    panels = []
    for v in data["variants"]:
        new = {k: ColumnDataSource({c: [] for c in COLUMNS[k]}, name=f"map-{k}-{v}") for k in sources}
        for k in sources:
            sources[k].append(new[k])
        p = figure(title=v, width=panel_width, height=panel_height, x_range=xr, y_range=yr, name=f"map-panel-{v}",
                   tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above")
        p.xaxis.axis_label, p.yaxis.axis_label = "first principal axis", "second principal axis"
        p.patches("xs", "ys", source=new["hulls"], fill_color="colour", line_color="colour", fill_alpha=0.08,
                  line_alpha=0.6, line_width=1.5)
        p.multi_line("xs", "ys", source=new["trails"], line_color="colour", line_alpha=0.35, line_width=1)
        p.scatter("x0", "y0", source=new["arrows"], color=GREY, size=4, alpha=0.8)  # where a moved word was
        p.add_layout(Arrow(end=NormalHead(size=9, fill_color="#444444", line_color="#444444"), source=new["arrows"],
                           x_start="x0", y_start="y0", x_end="x1", y_end="y1", line_color="colour", line_alpha=0.7))
        p.multi_line("xs", "ys", source=new["bound"], line_color="black", line_width=1.5)
        p.multi_line("xs", "ys", source=new["control"], line_color="black", line_dash="dashed", line_width=1)
        dots = p.scatter("x", "y", source=new["points"], marker="marker", fill_color="colour", line_color="black",
                         size=9, name=f"map-dots-{v}")
        p.text("x", "y", text="label", source=new["points"], text_font_size="8pt", x_offset=5, y_offset=-3,
               text_color="#333")  # pair and control words only: the groups' other words crowd; hover names them
        p.add_tools(HoverTool(renderers=[dots], tooltips=[
            ("word", "@word (@group)"), ("partner", "@partner (@role)"),
            ("cos to partner", "@cos_before → @cos_after"), ("cos to its base vector", "@self_cos"),
            ("nearest before", "@nn_before"), ("nearest now", "@nn_after")]))
        panels.append(p)
    layer = RadioButtonGroup(labels=data["levels"], active=len(data["levels"]) - 1, name="map-layer")
    step = Slider(start=0, end=max(1, len(data["steps"]) - 1), step=1, value=len(data["steps"]) - 1,
                  title="training step", name="map-step", width=panel_width, show_value=False,
                  disabled=len(data["steps"]) < 2)
    info = Div(text="", name="map-info")
    legend = Div(text=_legend_html(data, group_colours))
    update = CustomJS(args=dict(layer=layer, step=step, colours=colours, group_colours=group_colours,
                                markers=[MARKERS[r] for r in data["role"]], xr=xr, yr=yr, sources=sources, info=info),
                      code=UPDATE)
    layer.js_on_change("active", update)
    step.js_on_change("value", update)
    layout = column(layer, step, legend, gridplot(panels, ncols=2, toolbar_location="above"), info)
    doc = Document()
    doc.add_root(layout)
    doc.js_on_event(DocumentReady, update)
    script, div = components(layout)
    return (f"<div class='minilm-map'><script type='application/json' id='minilm-map-data'>{data_json(data)}</script>"
            f"{Resources(mode='inline', components=BOKEH_PARTS).render_js()}{script}{div}</div>")


def _legend_html(data: dict, group_colours: list[str]) -> str:
    groups = " ".join(f"<span style='color:{c}'>●</span> {g}" for g, c in zip(data["groups"], group_colours))
    return (f"<p style='font-size:12px'>{groups}; ▲ a word of a bound pair (solid line to its partner), ■ a word "
            "of a control pair (dashed line); a faint trail is a word's path over the kept steps, the arrow runs "
            "from where it was in the base to where it is at this step. Hover a word for its neighbours and its "
            "cosine to its partner, before and after.</p>")


def fig_map(data: dict, levels: list[str] | None = None) -> Figure:
    """The static picture: rows are levels (default: static and the last layer), columns the variants at their
    last kept step; grey dots the base, arrows to where each word went, bound pairs joined."""
    levels = levels or [data["levels"][0], data["levels"][-1]]
    colours, _ = _colours(data)
    variants = data["variants"]
    fig = Figure(figsize=(3.3 * len(variants), 3.2 * len(levels)))
    axes = fig.subplots(len(levels), len(variants), squeeze=False)
    for r, level in enumerate(levels):
        x0, x1, y0, y1 = data["bounds"][level]
        for c, v in enumerate(variants):
            ax = axes[r, c]
            was = np.asarray(data["xy"][level][v][0], dtype=float)  # (M, 2); None -> nan
            now = np.asarray(data["xy"][level][v][-1], dtype=float)
            ax.scatter(*was.T, s=8, color=GREY)
            for k, w in enumerate(data["words"]):
                if np.all(np.isfinite([*was[k], *now[k]])):
                    ax.annotate("", now[k], was[k], arrowprops=dict(arrowstyle="->", color=colours[k], lw=0.8))
                    ax.text(*now[k], w, fontsize=5)
                j = data["partner"][k]
                if j > k and data["role"][k] == "bound":
                    ax.plot(*np.stack([now[k], now[j]]).T, "-", color="black", lw=0.8)
            ax.scatter(*now.T, s=10, c=colours)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{v}, {level} (axes keep {100 * data['variance_share'][level]:.0f}%)", fontsize=8)
    fig.suptitle(f"Probe words from the base (grey) to step {data['steps'][-1]}; bound pairs joined", fontsize=9)
    fig.tight_layout()
    return fig


def data_json(data: dict) -> str:
    """The map's numbers as the page embeds them (a `</` could end the script element early)."""
    return json.dumps(data, allow_nan=False).replace("</", "<\\/")


def read_data(page: str) -> dict:
    """The map's numbers back from a report page (for tests: the page draws what metrics.json holds)."""
    start = page.index("<script type='application/json' id='minilm-map-data'>")
    body = page[page.index(">", start) + 1: page.index("</script>", start)]
    return json.loads(body)
