"""A self-contained HTML report (inline CSS and SVG, data-URI images, no scripts, no external URLs).

``report`` dict (only ``title`` and ``summary`` required; sections render only when present)::

    title: str, subtitle: str, summary: dict (nested; written as summary.json, shown flattened)
    headline: [(label, value)]                       big numbers shown as cards at the top
    notes: [str]                                     plain-text paragraphs
    detection: {section name: {                      one section per setting, e.g. "20% misaligned"
        curves: {method: (scores (n,), labels (n,) bool)},   -> ROC and precision@k plots
        metrics: DataFrame (one row per method),
        positive: (n,), negative: (n,), labels: (n,) bool | None,   -> influence-part histograms
        gallery: [{pair_id, image, caption, true_class, misaligned, scores: {name: float}}]}}
    traceback: [{title, image, caption, top: [{pair_id, image, caption, true_class, misaligned,
                                                relative_influence, influence}]}]
    tables: {caption: DataFrame}

``image`` values are anything :func:`~ecif_fast.report.images.to_png_data_uri` takes (array, path,
None). Every user-provided string is HTML-escaped.
"""
from __future__ import annotations

import json
import math
import re
from html import escape
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from . import plots
from .images import to_png_data_uri
from .output import _default_index, atomic_output_dir, write_table

_CSS = """
:root { --bad: #c62828; --good: #2e7d32; --muted: #5f6368; --line: #e0e3e7; --up: #1f77b4;
        --down: #e8710a; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #202124;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 24px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 20px 0 8px; color: #3c4043; }
.subtitle, .muted { color: var(--muted); }
.subtitle { margin: 0 0 12px; }
nav { font-size: 13px; margin: 8px 0 16px; }
nav a { color: var(--up); margin-right: 14px; text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin: 16px 0; }
.notes p { margin: 0 0 8px; white-space: pre-line; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { flex: 1 1 170px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
        padding: 12px 16px; }
.card .v { font-size: 24px; font-weight: 600; overflow-wrap: anywhere; }
.card .l { color: var(--muted); font-size: 13px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 8px; }
svg { display: block; max-width: 100%; height: auto; }
svg * { stroke-linejoin: round; stroke-linecap: butt; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: #f8f9fa; font-weight: 600; }
.num { text-align: right; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; }
.item { margin: 0; display: grid; grid-template-columns: 64px 1fr; gap: 6px 10px; padding: 8px;
        border: 1px solid var(--line); border-left-width: 5px; border-radius: 6px; background: #fff;
        min-width: 0; align-content: start; }
.item.bad { border-color: var(--bad); background: #fdf3f3; }
.item.good { border-color: var(--good); }
.item figcaption { min-width: 0; font-size: 12px; }
.bars { grid-column: 1 / -1; font-size: 12px; }
.thumb { width: 64px; height: 64px; flex: none; object-fit: contain; image-rendering: pixelated;
         background: #eee; border-radius: 3px; }
.thumb.big { width: 96px; height: 96px; }
div.thumb { display: flex; align-items: center; justify-content: center; color: var(--muted);
            font-size: 11px; }
.pid { font-weight: 600; }
.tag { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11px; font-weight: 600;
       color: #fff; margin-left: 4px; }
.tag.bad { background: var(--bad); }
.tag.good { background: var(--good); }
.cap { margin: 2px 0; overflow-wrap: anywhere; }
.bar { display: grid; grid-template-columns: 5.5em 1fr 5em; gap: 6px; align-items: center;
       margin-top: 2px; }
.bar .n { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar .x { text-align: right; font-variant-numeric: tabular-nums; }
.track { position: relative; height: 8px; background: #eef0f2; border-radius: 2px; }
.track::after { content: ""; position: absolute; left: 50%; top: -2px; bottom: -2px;
                border-left: 1px solid #9aa0a6; }
.fill { position: absolute; top: 0; bottom: 0; background: var(--up); }
.fill.neg { background: var(--down); }
.trace { display: flex; gap: 16px; padding: 12px 0; border-top: 1px solid var(--line); }
.trace:first-of-type { border-top: 0; }
.query { flex: 0 0 200px; font-size: 13px; overflow-wrap: anywhere; }
.query .t { font-weight: 600; margin-top: 6px; }
.trace .gallery { flex: 1; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
footer a { color: inherit; }
""".strip()


def render_report(report: dict, *, files: list[str] | None = None) -> str:
    """The full HTML page for ``report`` (schema in the module docstring) as a string.

    ``files``: optional names of files written next to the page, listed with relative links.
    Deterministic: the same report gives the same bytes.
    """
    title = str(report.get("title", "ecif_fast report"))
    nav, body = [], []

    def add(anchor: str, heading: str, html: str) -> None:
        nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
        body.append(f'<section id="{anchor}">\n<h2>{_e(heading)}</h2>\n{html}</section>')

    notes = report.get("notes") or []
    if notes:
        notes = [notes] if isinstance(notes, str) else notes
        add("notes", "Notes", '<div class="notes">' + "".join(f"<p>{_e(p)}</p>" for p in notes) + "</div>\n")
    for i, (name, section) in enumerate((report.get("detection") or {}).items()):
        add(f"detection-{i + 1}", f"Detection: {name}", _detection(section))
    if report.get("traceback"):
        add("traceback", "Trace-back: training pairs behind test predictions",
            "".join(_trace(item) for item in report["traceback"]))
    for i, (caption, df) in enumerate((report.get("tables") or {}).items()):
        add(f"table-{i + 1}", str(caption), _table(df))
    if report.get("summary"):
        add("summary", "Summary", _table_rows(["key", "value"], [(k, v) for k, v in
                                                                  _flatten(report["summary"])]))
    head = [f"<header>\n<h1>{_e(title)}</h1>"]
    if report.get("subtitle"):
        head.append(f'<p class="subtitle">{_e(report["subtitle"])}</p>')
    if len(nav) > 1:
        head.append("<nav>" + "".join(nav) + "</nav>")
    head.append("</header>")
    if report.get("headline"):
        head.append('<div class="cards">' + "".join(
            f'<div class="card"><div class="l">{_e(label)}</div><div class="v">{_e(_fmt(value))}</div></div>'
            for label, value in report["headline"]) + "</div>")
    foot = "Generated by ecif_fast."
    if files:
        foot += " Files: " + ", ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in files) + "."
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(head) + "\n" + "\n".join(body)
            + f"\n<footer>{foot}</footer>\n</main>\n</body>\n</html>\n")


def write_report(out_dir, report: dict, tables: dict | None = None, *, overwrite: bool = True,
                 extra_files: dict | None = None, command: str = "report", inputs=()) -> Path:
    """Write ``out_dir/`` = report.html, summary.json and ``name.csv`` / ``name.parquet`` per table.

    The folder appears complete or not at all (:func:`~ecif_fast.report.output.atomic_output_dir`, which
    also writes the marker ``.ecif-fast-output`` naming ``command``). An existing ``out_dir`` is replaced
    only when it is empty or an earlier ecif-fast output (with ``overwrite``); never the working folder, a
    folder above it, or one that holds a path of ``inputs``. ``summary.json`` is
    ``report["summary"]`` with indent 2, NaN / ±inf as null, numpy values as plain numbers.
    ``tables``: ``{name: DataFrame}``, ``name`` a plain file stem (letters, digits, ``._-``).
    ``extra_files``: ``{file name: writer(path)}`` for further files (e.g. checkpoints), written inside the
    same atomic folder and linked from the page. Returns the path of report.html.
    """
    tables, extra_files = dict(tables or {}), dict(extra_files or {})
    for kind, names in (("table", tables), ("extra file", extra_files)):
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", str(name)):
                raise ValueError(f"{kind} name {name!r} is not a plain file stem (letters, digits, '._-')")
    summary = json.dumps(_jsonable(report.get("summary", {}), "summary"), indent=2, allow_nan=False)
    with atomic_output_dir(out_dir, overwrite=overwrite, command=command, inputs=inputs) as tmp:
        written = []
        for name, df in tables.items():
            written += [p.name for p in write_table(df, tmp, str(name))]
        for name, writer in extra_files.items():
            writer(tmp / name)
            written.append(str(name))
        (tmp / "summary.json").write_text(summary + "\n", encoding="utf-8")
        html = render_report(report, files=["summary.json", *written])
        (tmp / "report.html").write_text(html, encoding="utf-8")
    return Path(out_dir) / "report.html"


def _e(value) -> str:
    return escape(str(value), quote=True)


def _fmt(value) -> str:
    """Display text of a table cell or summary value: floats to 4 significant digits, NaN/None '–'."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        value = float(value)
        return "–" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(v) for v in np.asarray(value, dtype=object).ravel()) + "]"
    return str(value)


def _is_num(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def _table_rows(header, rows) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = "".join(f'<td class="num">{_e(_fmt(v))}</td>' if _is_num(v) else f"<td>{_e(_fmt(v))}</td>"
                        for v in row)
        lines.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(lines) + "\n</tbody></table></div>\n")


def _table(df) -> str:
    """A pandas DataFrame as an escaped HTML table (a named or non-range index becomes columns)."""
    if not _default_index(df):
        df = df.reset_index()
    return _table_rows([str(c) for c in df.columns], df.itertuples(index=False, name=None))


def _flatten(tree, prefix: str = ""):
    """Yield ``("a.b.c", leaf)`` for a nested dict (an empty dict is a leaf shown as '{}')."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, "{}" if isinstance(value, dict) else value


def _jsonable(value, where: str):
    """``value`` with numpy / torch numbers and arrays as plain Python, NaN and ±inf as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):            # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist(), where)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------------
# sections

def _detection(section: dict) -> str:
    parts = []
    curves = section.get("curves")
    if curves:
        parts.append(f'<div class="plots">\n{plots.roc_plot(curves)}'
                     f'{plots.precision_at_k_plot(curves)}</div>\n')
    if section.get("metrics") is not None:
        parts.append("<h3>Detection metrics</h3>\n" + _table(section["metrics"]))
    if section.get("positive") is not None and section.get("negative") is not None:
        parts.append("<h3>Influence parts: own term (positive role) vs. negatives</h3>\n"
                     + plots.influence_histogram(section["positive"], section["negative"],
                                                 section.get("labels")))
    if section.get("gallery"):
        parts.append("<h3>Top flagged pairs</h3>\n" + _gallery(section["gallery"]))
    return "".join(parts)


def _trace(item: dict) -> str:
    top = []
    for t in item.get("top") or []:
        scores = {label: t[key] for key, label in (("relative_influence", "relative"),
                                                   ("influence", "influence")) if key in t}
        top.append(dict(t, scores={**scores, **(t.get("scores") or {})}))
    query = [_thumb(item.get("image"), size=96, alt=str(item.get("title", "test example")))]
    query.append(f'<div class="t">{_e(item.get("title", ""))}</div>')
    if item.get("caption"):
        query.append(f'<div class="cap">{_e(item["caption"])}</div>')
    return (f'<div class="trace">\n<div class="query">{"".join(query)}</div>\n'
            f'{_gallery(top)}</div>\n')


def _gallery(items: list[dict]) -> str:
    """Cards of training pairs: thumbnail, id, misaligned/clean tag, caption, class, score bars.

    Each score's bar is scaled by the largest ``|value|`` of that score name in this gallery; positive
    values extend right of the centre line, negative ones left in another colour.
    """
    scale: dict[str, float] = {}
    for it in items:
        for name, v in (it.get("scores") or {}).items():
            v = _float(v)
            if math.isfinite(v):
                scale[name] = max(scale.get(name, 0.0), abs(v))
    cards = []
    for it in items:
        mis = it.get("misaligned")
        cls, tag = {True: ("bad", '<span class="tag bad">misaligned</span>'),
                    False: ("good", '<span class="tag good">clean</span>')}.get(
                        None if mis is None else bool(mis), ("", ""))
        text = [f'<div class="pid">pair {_e(it.get("pair_id", "?"))}{tag}</div>']
        if it.get("caption") is not None:
            text.append(f'<div class="cap">{_e(it["caption"])}</div>')
        if it.get("true_class") is not None:
            text.append(f'<div class="muted">true class: {_e(it["true_class"])}</div>')
        bars = "".join(_bar(name, _float(v), scale.get(name, 0.0))
                       for name, v in (it.get("scores") or {}).items())
        thumb = _thumb(it.get("image"), alt=f"pair {it.get('pair_id', '?')}")
        cards.append(f'<figure class="item {cls}">{thumb}<figcaption>{"".join(text)}</figcaption>'
                     + (f'<div class="bars">{bars}</div>' if bars else "") + "</figure>")
    return '<div class="gallery">\n' + "\n".join(cards) + "\n</div>\n"


def _bar(name: str, value: float, max_abs: float) -> str:
    fill = ""
    if math.isfinite(value) and max_abs > 0:
        width = 50.0 * abs(value) / max_abs
        left = 50.0 if value >= 0 else 50.0 - width
        fill = (f'<span class="fill{"" if value >= 0 else " neg"}" '
                f'style="left:{left:.2f}%;width:{width:.2f}%"></span>')
    return (f'<div class="bar"><span class="n" title="{_e(name)}">{_e(name)}</span>'
            f'<span class="track">{fill}</span><span class="x">{_e(_fmt(value))}</span></div>')


def _thumb(image, *, size: int = 64, alt: str) -> str:
    if image is None:                       # the data has no image for this pair: no placeholder
        return ""
    big = " big" if size > 64 else ""
    uri = to_png_data_uri(image, size=size)
    if uri is None:
        return f'<div class="thumb{big}">no image</div>'
    return f'<img class="thumb{big}" src="{uri}" alt="{_e(alt)}">'


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
