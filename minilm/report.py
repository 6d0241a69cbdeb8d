"""The comparison report: matplotlib figures and one self-contained HTML page, plus metrics.json.

`write(out, result)` turns the dict of `minilm.analysis.compare.compare` into
    out/report.html     one file: figures embedded as base64 PNG, opens with no server
    out/metrics.json    every number in the page
    out/figures/*.png   the figures on their own
The folder is written beside the old one and swapped in, like a checkpoint.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global state, no display needed

from minilm import folders
from minilm.checkpoint import staging_dir, swap_in
from minilm.errors import MinilmError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def finite(x):
    """JSON has no inf or NaN: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite(x.tolist())
    if isinstance(x, np.generic):
        return finite(x.item())
    return x


def _matrix_names(weights: dict) -> list[str]:
    """The names of the weight matrices in one model's weight results (vectors have no spectra)."""
    return [n for n, r in weights.items() if "energy_rank_delta" in r]


# ---------------------------------------------------------------- figures


def fig_relative_change(result) -> Figure:
    models = result["models"]
    names = _matrix_names(result["weights"][models[0]])
    fig = Figure(figsize=(8, 0.22 * len(names) * len(models) + 1.2))
    ax = fig.subplots()
    height = 0.8 / len(models)
    for i, m in enumerate(models):
        values = [result["weights"][m][n]["relative"] for n in names]
        ax.barh(np.arange(len(names)) + i * height, values, height, label=m, color=PALETTE[i % len(PALETTE)])
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative change ||ΔW||_F / ||W0||_F")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_spectra(result) -> Figure:
    """Per model: singular values of ΔW for every matrix, and the fraction of ||ΔW||² of the best rank k."""
    models = result["models"]
    fig = Figure(figsize=(10, 3.2 * len(models)))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, m in enumerate(models):
        w = result["weights"][m]
        for n in _matrix_names(w):
            s = np.asarray(w[n]["singular_values_delta"], dtype=float)
            if s.size and s[0] > 0:
                axes[row, 0].semilogy(np.arange(1, s.size + 1), s, lw=0.8, alpha=0.6)
            capture = w[n]["lowrank_capture_delta"]
            axes[row, 1].plot(np.arange(1, len(capture) + 1), capture, lw=0.8, alpha=0.6)
        axes[row, 0].set_title(f"{m}: singular values of ΔW (one line per matrix)", fontsize=9)
        axes[row, 0].set_xlabel("index")
        axes[row, 1].set_title(f"{m}: share of ||ΔW||² in the best rank-k part", fontsize=9)
        axes[row, 1].set_xlabel("k")
        axes[row, 1].set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def fig_intruders(result) -> Figure:
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, m in enumerate(result["models"]):
        w = result["weights"][m]
        names = _matrix_names(w)
        eps = sorted(float(e) for e in w[names[0]]["intruder_sweep"])
        total = [sum(w[n]["intruder_sweep"][_sweep_key(w[n]["intruder_sweep"], e)] for n in names) for e in eps]
        ax1.plot(eps, total, "o-", label=m, color=PALETTE[i % len(PALETTE)])
        ax2.scatter([w[n]["delta_direction"] for n in names], [w[n]["delta_magnitude"] for n in names],
                    label=m, s=12, color=PALETTE[i % len(PALETTE)])
    ax1.set_xlabel("ε (best |cos| with any base singular vector below ε = intruder)")
    ax1.set_ylabel("intruder dimensions, all matrices")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("ΔD: mean (1 − cos) of output-unit directions")
    ax2.set_ylabel("ΔM: mean |Δ| of output-unit norms")
    ax2.set_title("magnitude vs direction (DoRA §4.1), one point per matrix", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _sweep_key(table: dict, eps: float):
    """The key of `table` (an intruder sweep, keyed by ε as text) that stands for ε."""
    return next(k for k in table if float(k) == eps)


def fig_pairs_and_clusters(result) -> Figure:
    """Per layer (0 = embeddings entering block 0): bound pairs' and controls' cosine, and cluster scores."""
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, m in enumerate(result["models"]):
        ctx = result["vectors"][m]["contextual"]
        layers = [c["layer"] for c in ctx]
        color = PALETTE[i % len(PALETTE)]
        for kind, style in (("pairs", "-"), ("controls", ":")):
            base = [np.mean([r["cosine"] for r in c["base"][kind]]) if c["base"][kind] else np.nan for c in ctx]
            tuned = [np.mean([r["cosine"] for r in c["tuned"][kind]]) if c["tuned"][kind] else np.nan for c in ctx]
            if i == 0:
                ax1.plot(layers, base, style, color="grey", label=f"base {kind}")
            ax1.plot(layers, tuned, style, color=color, label=f"{m} {kind}")
        if "silhouette" in ctx[0]["base"]:
            if i == 0:
                ax2.plot(layers, [c["base"]["silhouette"] for c in ctx], color="grey", label="base")
            ax2.plot(layers, [c["tuned"]["silhouette"] for c in ctx], color=color, label=m)
    for ax in (ax1, ax2):
        ax.set_xticks(layers)
        ax.set_xlabel("layer boundary (0: embeddings entering block 0)")
    ax1.set_title("mean cosine of bound pairs (solid) and controls (dotted)", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.set_title("silhouette of the labelled word groups", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _heatmaps(panels, title_row: str, xlabel: str, ylabel: str, vmin=None, vmax=None, cmap="viridis") -> Figure:
    fig = Figure(figsize=(3.6 * len(panels), 3.3))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, grid) in zip(axes, panels):
        image = ax.imshow(np.asarray(grid, dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, origin="upper")
        ax.set_title(f"{name}: {title_row}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def fig_cka(result) -> Figure:
    panels = [(m, result["vectors"][m]["cka"]["linear"]) for m in result["models"]]
    return _heatmaps(panels, "linear CKA", "tuned layer", "base layer", 0, 1)


def fig_attention_js(result) -> Figure:
    panels = [(m, result["vectors"][m]["attention"]["js"]) for m in result["models"]]
    return _heatmaps(panels, "JS(base, tuned)", "head", "layer", 0, None, "magma")


def fig_attention_maps(result) -> Figure | None:
    """The probe sentence's attention in the last layer, every head: base (top row) and each model."""
    first = result["vectors"][result["models"][0]]
    if "lens" not in first:
        return None
    rows = [("base", first["lens"]["base"]["attention"])] + [
        (m, result["vectors"][m]["lens"]["tuned"]["attention"]) for m in result["models"]]
    heads = len(rows[0][1][-1])
    fig = Figure(figsize=(2.2 * heads, 2.3 * len(rows)))
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for r, (name, maps) in enumerate(rows):
        for h in range(heads):
            axes[r, h].imshow(np.asarray(maps[-1][h]), cmap="Blues", vmin=0, vmax=1)
            axes[r, h].set_title(f"{name} head {h}", fontsize=8)
            axes[r, h].set_xticks([])
            axes[r, h].set_yticks([])
    fig.suptitle(f"last-layer attention on: {first['lens']['sentence']!r} (rows: queries, columns: keys)", fontsize=9)
    fig.tight_layout()
    return fig


def fig_adapter_subspaces(result) -> Figure | None:
    panels = []
    for pair, per_matrix in result["adapters"].items():
        for name, grids in list(per_matrix.items())[:2]:
            panels.append((f"{pair}\n{name}", grids["phi"]))
    if not panels:
        return None
    return _heatmaps(panels[:4], "φ(i, j)", "j", "i", 0, 1)


# ---------------------------------------------------------------- the page


VERDICT_COLOURS = {"true": "#2ca02c", "false": "#d62728"}  # anything else: not settled, grey


def fig_findings(claims: list[dict]) -> Figure:
    """One panel per claim: each finding's per-seed values (dots), mean and 95% interval (bar), threshold."""
    fig = Figure(figsize=(12, 2.2 * ((len(claims) + 1) // 2) + 0.6))
    axes = fig.subplots((len(claims) + 1) // 2, 2).ravel()
    for i, (ax, c) in enumerate(zip(axes, claims)):
        rows = c["findings"]
        for y, r in enumerate(rows):
            colour = VERDICT_COLOURS.get(r["verdict"], "grey")
            ax.plot(r["values"], [y] * len(r["values"]), "o", ms=3, color=colour, alpha=0.6)
            if np.isfinite(r["low"] if r["low"] is not None else np.nan):
                ax.plot([r["low"], r["high"]], [y, y], "-", lw=3, color=colour, alpha=0.5)
            ax.plot([r["mean"]], [y], "|", ms=12, mew=2, color=colour)
            ax.plot([r["threshold"]] * 2, [y - 0.4, y + 0.4], ":", color="black", lw=1)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{i + 1}. " + c["claim"][:70] + ("…" if len(c["claim"]) > 70 else ""), fontsize=8)
    for ax in axes[len(claims):]:
        ax.set_visible(False)
    fig.suptitle("Every seed's value (dots), mean and 95% t interval (bar), threshold (dotted); "
                 "green true, red false, grey not settled (Holm-corrected)", fontsize=9)
    fig.tight_layout()
    return fig


def claims_html(claims: list[dict], seed_list) -> str:
    """How the verdicts were reached (seeds, interval, test, correction), then one table row per claim."""
    from minilm.analysis.seeds import method_text
    n_verdicts = sum(len(c["findings"]) for c in claims)
    rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(c['claim'])}</td><td><b>{html.escape(c['verdict'])}</b>"
                   f"</td><td>{html.escape(c['evidence'])}</td><td>{html.escape(c['note'])}</td></tr>"
                   for i, c in enumerate(claims))
    return (f"<p>{html.escape(method_text(seed_list, n_verdicts))}</p><table><tr><th>#</th><th>claim</th>"
            "<th>verdict</th><th>evidence: mean [95% interval]</th><th>why it may differ from the literature</th>"
            f"</tr>{rows}</table>")


def _save_png(fig: Figure, path: Path) -> str:
    """Write `fig` to `path` as PNG; return the same bytes in base64, for embedding in the page."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x, digits=3):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _weights_table(result, model) -> str:
    w = result["weights"][model]
    names = sorted(_matrix_names(w), key=lambda n: -w[n]["relative"])
    rows = [(n, "x".join(map(str, w[n]["shape"])), _fmt(w[n]["relative"]), _fmt(w[n]["fro"]),
             w[n]["energy_rank_delta"], _fmt(w[n]["effective_rank_delta"]), w[n]["intruder_count"],
             _fmt(w[n]["amplification_factor"]), _fmt(w[n]["delta_magnitude"]), _fmt(w[n]["delta_direction"]))
            for n in names]
    return html_table(["matrix", "shape", "relative Δ", "||ΔW||_F", "energy rank ΔW", "effective rank ΔW",
                   "intruders", "amplification", "ΔM", "ΔD"], rows)


def _pairs_table(result, model) -> str:
    v = result["vectors"][model]
    rows = []
    for label, part in [("static embedding", v["static"])] + [(f"layer {c['layer']}", c) for c in v["contextual"]]:
        for kind in ("pairs", "controls"):
            for before, after in zip(part["base"][kind], part["tuned"][kind]):
                rows.append((label, kind[:-1], f"{before['a']}–{before['b']}", _fmt(before["cosine"]),
                             _fmt(after["cosine"]), _fmt(after["cosine"] - before["cosine"])))
    return html_table(["where", "kind", "pair", "cosine before", "cosine after", "change"], rows) if rows else ""


def _lens_table(result, model) -> str:
    lens = result["vectors"][model].get("lens")
    if not lens:
        return ""
    rows = []
    for layer, (before, after) in enumerate(zip(lens["base"]["top"], lens["tuned"]["top"])):
        show = lambda preds: ", ".join(f"{t!r} {p:.2f}" for t, p in preds)  # noqa: E731
        rows.append((layer, show(before), show(after)))
    return (f"<p>Next-token predictions read off every layer (logit lens) after "
            f"<code>{html.escape(lens['sentence'])}</code>:</p>" + html_table(["layer", "base", model], rows))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}img{max-width:100%}li{margin:.25em 0}code{background:#f3f3f3;padding:0 3px}
details{margin:.5em 0 1em}summary{cursor:pointer;font-weight:600}"""


REPORT_FILES = {"report.html", "metrics.json", "figures"}


def _check_replaceable(out: Path) -> None:
    """A report replaces `out` whole, so `out` must be missing, empty, or a report minilm wrote (marked,
    or from before marks: nothing but report.html, metrics.json and figures/)."""
    folders.check_path(out)
    if not out.is_dir() or folders.kind_of(out) == "report":
        return
    names = {f.name for f in out.iterdir()}
    if names and not (names <= REPORT_FILES | {folders.LOCK} and "report.html" in names):
        raise MinilmError(f"{out} holds files minilm did not write ({', '.join(sorted(names - REPORT_FILES)[:3])}, "
                          f"...); a report replaces its folder whole, so choose another --out")


def write_page(out: Path, title: str, blocks, metrics: dict) -> Path:
    """A report folder: report.html from `blocks`, metrics.json, figures/*.png; replaces `out` whole.

    blocks: (heading or None, content) pairs; content is HTML, a matplotlib Figure (saved and embedded)
    or None (skipped). Figures are named after their headings' order: figures/01.png, 02.png, ...
    """
    out = Path(out)
    _check_replaceable(out)
    tmp = staging_dir(out)
    (tmp / "figures").mkdir()
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in blocks:
        if content is None:
            continue
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, tuple):  # (file name, Figure)
            name, fig = content
            data = _save_png(fig, tmp / "figures" / f"{name}.png")
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        else:
            parts.append(content)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    (tmp / "report.html").write_text(page, encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps(finite(metrics), allow_nan=False), encoding="utf-8")
    folders.mark(tmp, "report")
    swap_in(tmp, out)
    return out / "report.html"


def comparison_blocks(result: dict) -> list:
    """The blocks of a comparison report: summary, figures, then per-model details."""
    summary = "".join(f"<h3>{html.escape(model)}</h3><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines)
                      + "</ul>" for model, lines in result["summary"].items())
    probe = result["probe"]
    note = (f"<p>Probe: {len(probe['words'])} words, {probe['windows'][0]} context windows of "
            f"{probe['windows'][1]} tokens, {len(probe['sentences'])} sentences."
            + (f" Not in the vocabulary, skipped: {html.escape(', '.join(probe['missing']))}." if probe["missing"]
               else "") + "</p>")
    blocks = [("Summary", summary + note)]
    figures = [("relative_change", "Which matrices moved, relative to their size", fig_relative_change),
               ("spectra", "Singular values of each change, and how much of it a rank-k part holds", fig_spectra),
               ("intruders", "Intruder dimensions against the threshold ε, and magnitude vs direction change",
                fig_intruders),
               ("pairs_clusters", "Bound pairs vs controls, and word-group clusters, layer by layer",
                fig_pairs_and_clusters),
               ("cka", "How similar base and tuned hidden states are, layer by layer", fig_cka),
               ("attention_js", "How far each head's attention moved", fig_attention_js),
               ("attention_maps", "Attention on a probe sentence, before and after", fig_attention_maps),
               ("adapter_subspaces", "Do two adapters learn the same directions? (Hu et al. §7.2)",
                fig_adapter_subspaces)]
    for name, caption, draw in figures:
        fig = draw(result)
        blocks.append((caption, None if fig is None else (name, fig)))
    for model in result["models"]:
        blocks.append((f"Details: {model}",
                       f"<details open><summary>weight matrices, most moved first</summary>"
                       f"{_weights_table(result, model)}</details>"
                       f"<details><summary>pairs and controls</summary>{_pairs_table(result, model)}</details>"
                       + _lens_table(result, model)))
    return blocks


def write(out: Path, result: dict, *, title: str, extra=(), lead=()) -> Path:
    """The comparison report of `compare`'s result, with `lead` blocks right after the summary and `extra`
    blocks at the end."""
    summary, *rest = comparison_blocks(result)
    return write_page(out, title, [summary, *lead, *rest, *extra], result)
