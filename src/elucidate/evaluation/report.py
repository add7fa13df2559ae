"""A one-page, self-contained HTML report of a run directory.

``write_report(run_dir)`` collects whatever the run has produced so far (every part is optional):

* ``config.yaml``: shown verbatim;
* ``metrics.jsonl``: a summary of the latest training record, the loss curve and the loss by
  noise level (both rendered on the fly);
* ``samples/*.png``: the latest sample grid (last by sorted file name), and ``samples.png`` if present;
* ``trajectory.png``: a denoising trajectory strip;
* ``eval/*.json``: every result (``elucidate eval``, ``elucidate likelihood``; one JSON object or a list of them
  per file, also the files of earlier versions), one table per metric: its value columns, the training step,
  sampler, NFE and samples, the other settings as ``key=value`` text, and the file;
* ``sweep/*.csv``: a table per file and a quality-vs-NFE plot (``sweep/<name>.png`` if it exists,
  else rendered from the ``sampler``, ``nfe``/``steps`` and ``value`` columns);
* ``schedules/nfe*.json``: the tuned schedules (``elucidate tune``) with their sampler, NFE and error, and a
  plot of their noise levels.

Numbers are shown to 4 significant digits (:func:`format_number`). Images are embedded as base64 data URIs and
the CSS is inline, so the page has no external resources; tables scroll inside their section, never the page.
A missing part names the command that makes it; a part that fails to load shows the error instead of breaking
the page. Usage: ``elucidate report RUN [--out OUT]``.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as _dt
import html
import io
import json
import math
import numbers
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image

from ..run.rundir import RunDir
from ..viz.common import atomic_write_bytes, figure_to_png
from ..viz.quality import plot_quality_vs_nfe, quality_series
from ..viz.training import loss_by_sigma_stages, plot_loss, plot_loss_by_sigma, read_metrics
from .evaluate import METRICS, domain_metric, result_settings

__all__ = ["write_report", "render_report", "format_number"]

REPORT_DPI = 110
MAX_TABLE_ROWS = 200
SIGNIFICANT_DIGITS = 4

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d1f23; line-height: 1.45; overflow-wrap: break-word; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header h1 { margin: 0 0 4px; font-size: 1.6em; overflow-wrap: anywhere; }
header .meta { color: #666; font-size: 0.9em; overflow-wrap: anywhere; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
          padding: 14px 20px 18px; margin-top: 18px; min-width: 0; }
section h2 { margin: 0 0 10px; font-size: 1.2em; border-bottom: 1px solid #eee; padding-bottom: 6px; }
h3 { font-size: 1em; margin: 16px 0 6px; overflow-wrap: anywhere; }
p { overflow-wrap: anywhere; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #666; font-size: 0.85em; margin-top: 4px; }
img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
pre { background: #f7f7f9; border: 1px solid #e4e4e8; border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; font-size: 0.85em; }
code { background: #f0f1f4; border-radius: 4px; padding: 1px 5px; font-size: 0.9em; }
.scroll { overflow-x: auto; max-width: 100%; margin: 6px 0; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border-bottom: 1px solid #e6e6ea; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f1f4; }
tbody tr:nth-child(even) { background: #fafafb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { min-width: 12em; max-width: 36em; overflow-wrap: anywhere; font-size: 0.95em; }
td.file, .file { min-width: 10em; overflow-wrap: anywhere; color: #777; font-size: 0.9em; }
td.wrap { min-width: 7em; max-width: 20em; overflow-wrap: anywhere; }
td.text .file, td.wrap .file { display: block; margin-top: 2px; }
.na { color: #777; }
.error { color: #a33; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 12px; }
.card { background: #fff; border-radius: 8px; padding: 8px 14px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
        max-width: 100%; overflow-wrap: anywhere; }
.card .k { color: #777; font-size: 0.8em; } .card .v { font-size: 1.15em; font-weight: 600; }
"""

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")


def format_number(value, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A number for people: integers as they are; other numbers to ``digits`` significant digits without
    trailing zeros, in plain notation from 0.001 to 999999 and in e-notation outside it
    (``498.88051229504117`` -> ``498.9``, ``0.000012345`` -> ``1.234e-5``, ``2.0`` -> ``2``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if -3 <= magnitude < 6:
        text = f"{x:.{max(digits - 1 - magnitude, 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exponent = f"{x:.{max(digits - 1, 0)}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


class _Html(str):
    """Cell content that is already HTML (escaped parts), shown as is."""


def _is_num(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, str) and bool(_NUMBER.match(value.strip()))


def _short_list(values: Sequence) -> str:
    items = [_fmt(v) for v in values]
    if len(items) > 6:
        return f"[{', '.join(items[:3])}, …, {items[-1]}] ({len(items)} values)"
    return "[" + ", ".join(items) + "]"


def _fmt(value) -> str:
    """Any cell value as short readable text: numbers to 4 significant digits (numeric strings too), lists
    shortened, mappings as ``key=value`` text."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.match(text) and not _INTEGER.match(text):
            return format_number(float(text))
        return value
    if isinstance(value, (bool, numbers.Real)):
        return format_number(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return _short_list(value)
    return str(value)


def _settings_text(settings: Mapping) -> str:
    return "\u00a0· ".join(f"{k}={_fmt(v)}" for k, v in settings.items())  # a line never starts with "·"


def _table(rows: Sequence[dict], columns: Sequence[str], headers: Mapping[str, str] | None = None,
           classes: Mapping[str, str] | None = None) -> str:
    """A table in a wrapper that scrolls sideways inside its section (the page itself never does)."""
    headers, classes = headers or {}, classes or {}
    head = "".join(f"<th>{_e(headers.get(c, c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cls = classes.get(c) or ("num" if _is_num(value) else "")
            text = value if isinstance(value, _Html) else _e(_fmt(value))
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


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


def _todo(what: str, *commands: str) -> str:
    """An empty part: what is missing and the command(s) that make it."""
    cmds = " or ".join(f"<code>{_e(c)}</code>" for c in commands)
    return f'<p class="na">{_e(what)} — run {cmds}</p>'


@dataclasses.dataclass
class _Commands:
    """The commands that fill each part, spelled for this run (``RUN`` as given, quoted for a shell)."""

    run: str
    metric: str  # "--metric NAME" args for eval / sweep on this run's data

    @classmethod
    def of(cls, run_dir: Path) -> _Commands:
        run = shlex.quote(str(run_dir))
        found = domain_metric(_run_dataset(run_dir))
        inception = [m.name for m in METRICS.values() if m.features == "inception"]
        metric = f"--metric {found}" if found else f"--metric {(inception or ['fid'])[0]} --inception FILE"
        return cls(run, metric)


def _run_dataset(run_dir: Path) -> str | None:
    """``data.dataset`` of the run's config.yaml (None if it cannot be read)."""
    try:
        import yaml

        config = yaml.safe_load(RunDir(run_dir).config.read_text(encoding="utf-8"))
        return str(config["data"]["dataset"])
    except Exception:
        return None


# --- parts -------------------------------------------------------------------------------------
def _config_part(run_dir: Path, cmd: _Commands) -> str:
    path = RunDir(run_dir).config
    if not path.is_file():
        return _todo("No config.yaml", f"elucidate train CONFIG.yaml --out {cmd.run}")
    return f"<pre>{_e(path.read_text(encoding='utf-8', errors='replace'))}</pre>"


def _duration(seconds) -> str:
    if not _is_num(seconds):
        return ""
    s = int(float(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _training_part(run_dir: Path, records: list[dict] | None, cmd: _Commands) -> str:
    if not records:
        what = "No training records yet" if records is None else "No training records in metrics.jsonl yet"
        return _todo(what, f"elucidate train CONFIG.yaml --out {cmd.run}")
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
            return '<p class="na">No loss by noise level: these records have no per-sigma statistics.</p>'
        return _figure_img(plot_loss_by_sigma(records), "loss by noise level",
                           "Count-weighted mean loss per sigma bin over consecutive thirds of the "
                           "logged records (early, middle, late); grey: how often each bin was trained.")

    parts.append(_guard("loss by noise level", by_sigma))
    return "".join(parts)


def _png_part(path: Path, what: str, caption: str) -> str:
    return _guard(what, lambda: _img(path.read_bytes(), what, caption))


def _samples_part(run_dir: Path, cmd: _Commands) -> str:
    run = RunDir(run_dir)
    files = sorted(run.samples.glob("*.png"))
    parts = []
    if files:
        latest = files[-1]
        parts.append(_png_part(latest, "latest sample grid", f"samples/{latest.name} (latest of "
                               f"{len(files)} sample file{'s' * (len(files) > 1)})"))
    if run.final_samples.is_file():  # the final grid that `elucidate demo` writes
        parts.append(_png_part(run.final_samples, "final samples", run.final_samples.name))
    if parts:
        return "".join(parts)
    return _todo("No sample grids yet (training writes samples/step-*.png every training.sample_every steps)",
                 f"elucidate sample {cmd.run} --seeds 0-63 --out {shlex.quote(str(run.final_samples))}")


def _trajectory_part(run_dir: Path, cmd: _Commands) -> str:
    run = RunDir(run_dir)
    if not run.trajectory.is_file():
        return _todo("No denoising trajectory yet",
                     f"elucidate sample {cmd.run} --seeds 0-3 --out {shlex.quote(str(run.final_samples))} "
                     f"--trajectory {shlex.quote(str(run.trajectory))}")
    return _png_part(run.trajectory, run.trajectory.name,
                     "current x_i (top) and predicted x_0 = D(x_i; σ_i) (below) at selected steps")


# --- evaluation ----------------------------------------------------------------------------------
#: settings shown in their own columns (the rest is key=value text)
_KEY_COLUMNS = ("step", "sampler", "nfe", "num")
#: settings left out of the text when they have these values (the usual ones)
_QUIET = {"ema": True, "sampling_precision": "fp32"}


def _sampling_defaults() -> dict:
    from ..config.sampling import SamplingConfig

    out = {}
    for f in dataclasses.fields(SamplingConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    out.pop("steps", None)
    out.pop("sampler", None)
    return out


def _same(a, b) -> bool:
    """Equal as settings: a stored "inf" equals float inf, and true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) and not math.isfinite(a):
        return str(a) == str(b)
    return a == b


def _eval_records(run_dir: Path) -> tuple[list[tuple[dict, str]], list[str]]:
    """(result, file name) of every eval file (lists hold several results), and what could not be read."""
    records, errors = [], []
    for path in RunDir(run_dir).eval_results():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            errors.append(f"eval/{path.name}: {exc}")
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            if isinstance(item, dict):
                records.append(({"metric": item.get("metric", path.stem), **item}, path.name))
    return records, errors


def _main_value(record: Mapping):
    return record.get("value", record.get("mean"))


def _eval_row(record: Mapping, file: str, defaults: Mapping) -> dict:
    settings = result_settings(record)
    row = {"value": _main_value(record), "file": file}
    values = record.get("values")
    if isinstance(values, list) and len(values) > 1:
        row["min"], row["values"] = record.get("min"), ", ".join(_fmt(v) for v in values)
    for key in ("std", "sem", "recall"):
        if _is_num(record.get(key)):
            row[key] = record[key]
    if _is_num(record.get("precision")) and record.get("precision") != row["value"]:
        row["precision"] = record["precision"]
    for key in _KEY_COLUMNS:
        row[key] = settings.get(key, record.get(key))
    metric = METRICS.get(str(record.get("metric")))
    rest = {}
    for key, value in settings.items():
        if key in _KEY_COLUMNS or key in ("metric", "seeds") or value is None or value == {} or value == []:
            continue  # seeds follow from samples and repeats
        if key in _QUIET and _same(value, _QUIET[key]):
            continue
        if key in defaults and _same(defaults[key], value):
            continue
        if key == "features" and metric is not None and value == metric.features:
            continue  # the metric's own feature network
        if key == "checkpoint" and str(value).startswith("checkpoints/"):
            continue  # the regular checkpoint of that training step
        rest[key] = value
    row["settings"] = _Html(f'{_e(_settings_text(rest))}<span class="file">{_e(file)}</span>')
    return row


def _order(row: dict) -> tuple:
    step = float(row["step"]) if _is_num(row.get("step")) else -math.inf
    nfe = float(row["nfe"]) if _is_num(row.get("nfe")) else math.inf
    return step, str(row.get("sampler") or ""), nfe, str(row.get("num") or ""), row["file"]


_OUTCOME_HEADERS = {"min": "min", "values": "per repeat", "std": "std", "sem": "s.e.m.", "precision": "precision",
                    "recall": "recall"}


def _eval_part(run_dir: Path, cmd: _Commands) -> str:
    records, errors = _eval_records(run_dir)
    notes = "".join(f'<p class="error">could not read {_e(err)}</p>' for err in errors)
    if not records:
        return _todo("No evaluations yet", f"elucidate eval {cmd.run} {cmd.metric}",
                     f"elucidate likelihood {cmd.run}") + notes
    defaults = _sampling_defaults()
    groups: dict[str, list[dict]] = {}
    for record, file in records:
        groups.setdefault(str(record["metric"]), []).append(_eval_row(record, file, defaults))
    parts = [f'<p class="na">{len(records)} result{"s" * (len(records) > 1)} in eval/, one file per setting; '
             f"numbers to {SIGNIFICANT_DIGITS} significant digits.</p>"]
    for metric in sorted(groups):
        rows = sorted(groups[metric], key=_order)
        outcomes = [k for k in _OUTCOME_HEADERS if any(k in r for r in rows)]
        keys = [k for k in _KEY_COLUMNS if any(r.get(k) is not None for r in rows)]
        columns = ["value", *outcomes, *keys, "settings"]
        unit = " (bits/dim)" if metric == "bits_per_dim" else ""
        headers = {"value": metric + unit, **_OUTCOME_HEADERS, "num": "samples", "settings": "other settings · file"}
        parts.append(f"<h3>{_e(metric)}</h3>")
        parts.append(_table(rows, columns, headers, {"settings": "text"}))
    return "".join(parts) + notes


def _latest_per_metric(records: list[tuple[dict, str]]) -> list[dict]:
    """The latest record of each metric: largest numeric step, then last file, then last in file."""
    def order(item: tuple[int, tuple[dict, str]]) -> tuple:
        k, (r, file) = item
        step = result_settings(r).get("step", r.get("step"))
        return (float(step) if _is_num(step) else -math.inf), file, k

    latest: dict[str, dict] = {}
    for _, (r, _file) in sorted(enumerate(records), key=order):
        latest[str(r["metric"])] = r
    return [latest[m] for m in sorted(latest)]


# --- sweeps and tuned schedules ------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader]
        return list(reader.fieldnames or []), rows


def _sweep_one(path: Path) -> str:
    columns, rows = _read_csv(path)
    parts = [f"<h3>sweep/{_e(path.name)}</h3>"]
    metric = path.stem.split("-vs-")[0] if "-vs-" in path.stem else "value"
    png = path.with_suffix(".png")
    if png.is_file():
        parts.append(_png_part(png, f"sweep plot {png.name}", f"sweep/{png.name}"))
    elif quality_series(rows):
        name = next((r["metric"] for r in rows if r.get("metric")), metric)
        parts.append(_guard("quality vs NFE", lambda: _figure_img(
            plot_quality_vs_nfe(rows, str(name)), f"{name} vs NFE", f"rendered from sweep/{path.name}")))
    shown = rows[:MAX_TABLE_ROWS]
    if len(rows) > len(shown):
        parts.append(f'<p class="na">first {len(shown)} of {len(rows)} rows</p>')
    parts.append(_table(shown, columns, {"value": metric}) if rows else
                 '<p class="na">No rows in this file.</p>')
    return "".join(parts)


def _sweep_part(run_dir: Path, cmd: _Commands) -> str:
    files = sorted(RunDir(run_dir).sweep.glob("*.csv"))
    if not files:
        return _todo("No sweep yet", f"elucidate sweep {cmd.run} {cmd.metric}")
    return "".join(_guard(f"sweep/{p.name}", lambda p=p: _sweep_one(p)) for p in files)


def _tuned_part(run_dir: Path, cmd: _Commands) -> str:
    from ..errors import UserError
    from ..tuning.stored import TunedSchedule
    from ..viz.tuned import plot_tuned_schedules

    folder = RunDir(run_dir).schedules
    stored, notes = [], []
    for path in sorted(folder.glob("nfe*.json")):
        try:
            stored.append((TunedSchedule.load(path), path.name))
        except UserError as exc:
            notes.append(f'<p class="error">{_e(exc)}</p>')
    if not stored:
        return _todo("No tuned schedules yet", f"elucidate tune {cmd.run} --nfe 9") + "".join(notes)
    stored.sort(key=lambda item: item[0].nfe)
    rows = []
    for t, name in stored:
        best = min(t.baselines, key=lambda b: b.get("heldout_error", math.inf), default=None)
        rows.append({"nfe": t.nfe, "sampler": t.sampler, "steps": t.steps, "options": t.options or None,
                     "held-out RMSE": t.heldout_error, "tuning RMSE": t.tuning_error,
                     "best classic schedule": None if best is None else
                     f"{best.get('sampler')}/{best.get('schedule')}: {_fmt(best.get('heldout_error'))}",
                     "sigmas": t.sigmas,
                     "file": _Html(f'{_e(t.model.get("checkpoint") or "")}<span class="file">{_e(name)}</span>')})
    columns = [c for c in rows[0] if any(r.get(c) is not None for r in rows)]
    parts = [f'<p class="na">Use one with <code>elucidate sample {_e(cmd.run)} --nfe N</code> or '
             f"<code>elucidate eval {_e(cmd.run)} --nfe N</code>; RMSE to the reference ODE solution on held-out "
             f"noise (lower is better).</p>",
             _table(rows, columns, {"file": "tuned on · file"},
                    {"sigmas": "wrap", "file": "wrap", "best classic schedule": "wrap"}),
             _guard("tuned schedules plot", lambda: _figure_img(
                 plot_tuned_schedules([t for t, _ in stored]), "tuned noise levels and error vs NFE",
                 "Left: each tuned schedule's sigma_i against the step i (dashed: Karras rho = 7 with the same "
                 "steps); right: held-out RMSE against NFE, tuned and classic schedules."))]
    return "".join(parts + notes)


def _cards(items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
                    for k, v in items if v not in ("", None))
    return f'<div class="cards">{cells}</div>' if cells else ""


# --- page ----------------------------------------------------------------------------------------
def render_report(run_dir: str | os.PathLike) -> str:
    """The report page for ``run_dir`` as an HTML string (see the module docstring)."""
    run_dir = Path(run_dir)
    cmd = _Commands.of(run_dir)
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
                   + [(str(r.get("metric")), _fmt(_main_value(r))) for r in evals[:6]])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        ("Configuration", "config", lambda: _config_part(run_dir, cmd)),
        ("Training", "training", lambda: metrics_error + _training_part(run_dir, records, cmd)),
        ("Samples", "samples", lambda: _samples_part(run_dir, cmd)),
        ("Denoising trajectory", "trajectory", lambda: _trajectory_part(run_dir, cmd)),
        ("Evaluation", "eval", lambda: _eval_part(run_dir, cmd)),
        ("Sampler sweeps", "sweep", lambda: _sweep_part(run_dir, cmd)),
        ("Tuned schedules", "tuned", lambda: _tuned_part(run_dir, cmd)),
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
