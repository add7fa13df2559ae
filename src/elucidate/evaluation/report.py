"""A one-page, self-contained HTML report of a run directory.

``write_report(run_dir)`` collects whatever the run has produced so far (every part is optional):

* ``config.yaml``: shown verbatim;
* ``metrics.jsonl``: a summary of the latest training record, the loss curve and the loss by
  noise level (both rendered on the fly);
* ``samples/*.png``: the latest sample grid (last by sorted file name), and ``samples.png`` if present;
* ``trajectory.png``: a denoising trajectory strip;
* ``eval/*.json``: one JSON object (or a list of them) per file, e.g. ``{"metric": "fd_digits",
  "value": 3.2, "num": 1000, "sampler": "heun", "steps": 18}``; the table shows the latest record
  per metric (largest ``step`` if present, then last file name);
* ``sweep/*.csv``: a table per file and a quality-vs-NFE plot (``sweep/<name>.png`` if it exists,
  else rendered from the ``sampler``, ``nfe``/``steps`` and ``value`` columns).

Images are embedded as base64 data URIs and the CSS is inline, so the page has no external
resources. A missing part shows a short "not available yet" note; a part that fails to load shows
the error instead of breaking the page. Usage: ``python -m elucidate.report RUN_DIR [-o OUT]``.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image

from ..run.rundir import RunDir
from ..viz.common import atomic_write_bytes, figure_to_png
from ..viz.quality import plot_quality_vs_nfe, quality_series
from ..viz.training import loss_by_sigma_stages, plot_loss, plot_loss_by_sigma, read_metrics

__all__ = ["write_report", "render_report"]

REPORT_DPI = 110
MAX_TABLE_ROWS = 200

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d1f23; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header h1 { margin: 0 0 4px; font-size: 1.6em; }
header .meta { color: #666; font-size: 0.9em; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
          padding: 14px 20px 18px; margin-top: 18px; }
section h2 { margin: 0 0 10px; font-size: 1.2em; border-bottom: 1px solid #eee; padding-bottom: 6px; }
h3 { font-size: 1em; margin: 14px 0 6px; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #666; font-size: 0.85em; margin-top: 4px; }
img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
pre { background: #f7f7f9; border: 1px solid #e4e4e8; border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 6px 0; }
th, td { border-bottom: 1px solid #e6e6ea; padding: 4px 10px; text-align: left; }
th { background: #f0f1f4; }
tbody tr:nth-child(even) { background: #fafafb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.na { color: #888; font-style: italic; }
.error { color: #a33; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 12px; }
.card { background: #fff; border-radius: 8px; padding: 8px 14px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.card .k { color: #777; font-size: 0.8em; } .card .v { font-size: 1.15em; font-weight: 600; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _na(what: str) -> str:
    return f'<p class="na">{_e(what)}: not available yet.</p>'


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _is_num(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cls = ' class="num"' if _is_num(value) else ""
            cells.append(f"<td{cls}>{_e(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, alt: str, caption: str | None = None, *, min_width: int = 320) -> str:
    """An embedded PNG; images narrower than ``min_width`` are shown upscaled without smoothing."""
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        width, height = im.size
    attrs, cls = f'width="{width}" height="{height}"', ""
    if 0 < width < min_width:
        k = math.ceil(min_width / width)
        attrs, cls = f'width="{width * k}" height="{height * k}"', ' class="pixelated"'
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img{cls} {attrs} alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _figure_img(fig, alt: str, caption: str | None = None) -> str:
    return _img(figure_to_png(fig, dpi=REPORT_DPI), alt, caption)


def _guard(what: str, build: Callable[[], str]) -> str:
    try:
        return build()
    except Exception as exc:  # a broken artefact must not take the whole page down
        return f'<p class="error">{_e(what)}: could not be shown ({_e(type(exc).__name__)}: {_e(exc)}).</p>'


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


# --- parts -------------------------------------------------------------------------------------
def _config_part(run_dir: Path) -> str:
    path = RunDir(run_dir).config
    if not path.is_file():
        return _na("config.yaml")
    return f"<pre>{_e(path.read_text(encoding='utf-8', errors='replace'))}</pre>"


def _duration(seconds) -> str:
    if not _is_num(seconds):
        return ""
    s = int(float(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _training_part(run_dir: Path, records: list[dict] | None) -> str:
    if records is None:
        return _na(RunDir(run_dir).metrics.name)
    if not records:
        return _na(f"training records in {RunDir(run_dir).metrics.name}")
    last = records[-1]
    summary = {"step": last.get("step"), "kimg": last.get("kimg"), "loss": last.get("loss"),
               "lr": last.get("lr"), "images/s": last.get("images_per_sec"),
               "elapsed (h:mm:ss)": _duration(last.get("seconds")), "records": len(records)}
    parts = [_table([summary], list(summary))]
    parts.append(_guard("loss curve", lambda: _figure_img(plot_loss(records), "training loss curve")))

    def by_sigma() -> str:
        try:
            loss_by_sigma_stages(records)
        except ValueError:
            return _na("loss by noise level (no per-sigma statistics logged)")
        return _figure_img(plot_loss_by_sigma(records), "loss by noise level",
                           "Count-weighted mean loss per sigma bin over consecutive thirds of the "
                           "logged records (early, middle, late); grey: how often each bin was trained.")

    parts.append(_guard("loss by noise level", by_sigma))
    return "".join(parts)


def _png_part(path: Path, what: str, caption: str) -> str:
    if not path.is_file():
        return _na(what)
    return _guard(what, lambda: _img(path.read_bytes(), what, caption))


def _samples_part(run_dir: Path) -> str:
    files = sorted(RunDir(run_dir).samples.glob("*.png"))
    parts = []
    if files:
        latest = files[-1]
        parts.append(_png_part(latest, "latest sample grid", f"samples/{latest.name} (latest of "
                               f"{len(files)} sample file{'s' * (len(files) > 1)})"))
    if RunDir(run_dir).final_samples.is_file():  # the final grid that `elucidate demo` writes
        parts.append(_png_part(RunDir(run_dir).final_samples, "final samples", RunDir(run_dir).final_samples.name))
    return "".join(parts) or _na("sample grids (samples/*.png)")


def _eval_records(run_dir: Path) -> tuple[list[dict], list[str]]:
    records, errors = [], []
    for path in sorted(RunDir(run_dir).eval.glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            errors.append(f"eval/{path.name}: {exc}")
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            if isinstance(item, dict):
                records.append({"metric": item.get("metric", path.stem), **item, "file": path.name})
    return records, errors


def _latest_per_metric(records: list[dict]) -> list[dict]:
    """The latest record of each metric: largest numeric ``step``, then last file, then last in file."""
    def order(item: tuple[int, dict]) -> tuple:
        k, r = item
        step = float(r["step"]) if _is_num(r.get("step")) else -math.inf
        return step, r["file"], k

    latest: dict[str, dict] = {}
    for _, r in sorted(enumerate(records), key=order):
        latest[str(r["metric"])] = r
    return [latest[m] for m in sorted(latest)]


def _eval_part(run_dir: Path) -> str:
    records, errors = _eval_records(run_dir)
    notes = "".join(f'<p class="error">could not read {_e(err)}</p>' for err in errors)
    if not records:
        return _na("evaluation results (eval/*.json)") + notes
    rows = _latest_per_metric(records)
    columns = ["metric", "value"]
    for r in rows:
        columns += [c for c in r if c not in columns and c != "file"]
    return _table(rows, columns + ["file"]) + notes


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader]
        return list(reader.fieldnames or []), rows


def _sweep_one(path: Path) -> str:
    columns, rows = _read_csv(path)
    parts = [f"<h3>sweep/{_e(path.name)}</h3>"]
    png = path.with_suffix(".png")
    if png.is_file():
        parts.append(_png_part(png, f"sweep plot {png.name}", f"sweep/{png.name}"))
    elif quality_series(rows):
        metric = next((r["metric"] for r in rows if r.get("metric")), path.stem)
        parts.append(_guard("quality vs NFE", lambda: _figure_img(
            plot_quality_vs_nfe(rows, str(metric)), f"{metric} vs NFE", f"rendered from sweep/{path.name}")))
    shown = rows[:MAX_TABLE_ROWS]
    if len(rows) > len(shown):
        parts.append(f'<p class="na">first {len(shown)} of {len(rows)} rows</p>')
    parts.append(_table(shown, columns) if rows else _na(f"rows in {path.name}"))
    return "".join(parts)


def _sweep_part(run_dir: Path) -> str:
    files = sorted(RunDir(run_dir).sweep.glob("*.csv"))
    if not files:
        return _na("sampler sweeps (sweep/*.csv)")
    return "".join(_guard(f"sweep/{p.name}", lambda p=p: _sweep_one(p)) for p in files)


def _cards(items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
                    for k, v in items if v not in ("", None))
    return f'<div class="cards">{cells}</div>' if cells else ""


# --- page ----------------------------------------------------------------------------------------
def render_report(run_dir: str | os.PathLike) -> str:
    """The report page for ``run_dir`` as an HTML string (see the module docstring)."""
    run_dir = Path(run_dir)
    metrics_error, records = "", None
    if RunDir(run_dir).metrics.is_file():
        try:
            records = read_metrics(RunDir(run_dir).metrics)
        except Exception as exc:
            metrics_error = (f'<p class="error">metrics.jsonl could not be read '
                             f"({_e(type(exc).__name__)}: {_e(exc)}).</p>")
            records = []
    last = records[-1] if records else {}
    try:
        evals = _latest_per_metric(_eval_records(run_dir)[0])
    except Exception:
        evals = []
    cards = _cards([("step", _fmt(last.get("step"))), ("kimg", _fmt(last.get("kimg"))),
                    ("loss", _fmt(last.get("loss")))]
                   + [(str(r.get("metric")), _fmt(r.get("value"))) for r in evals[:6]])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        ("Configuration", "config", lambda: _config_part(run_dir)),
        ("Training", "training", lambda: metrics_error + _training_part(run_dir, records)),
        ("Samples", "samples", lambda: _samples_part(run_dir)),
        ("Denoising trajectory", "trajectory", lambda: _png_part(
            RunDir(run_dir).trajectory, RunDir(run_dir).trajectory.name,
            "current x_i (top) and predicted x_0 = D(x_i; σ_i) (below) at selected steps")),
        ("Evaluation", "eval", lambda: _eval_part(run_dir)),
        ("Sampler sweeps", "sweep", lambda: _sweep_part(run_dir)),
    ]
    body = "".join(_section(title, anchor, _guard(title, build)) for title, anchor, build in sections)
    title = f"elucidate run: {run_dir.resolve().name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
            f'<header><h1>{_e(title)}</h1><div class="meta">{_e(run_dir.resolve())} &middot; '
            f"generated {_e(stamp)}</div>{cards}</header>{body}</main></body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of ``run_dir`` atomically to ``out`` (default ``run_dir/report.html``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = RunDir(run_dir).report if out is None else Path(out)
    return atomic_write_bytes(render_report(run_dir).encode("utf-8"), out)
