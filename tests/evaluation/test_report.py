"""elucidate.report: a self-contained HTML page of a run directory, checked as text and in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elucidate.evaluation import result_path
from elucidate.evaluation.report import format_number, render_report, write_report
from elucidate.run import RunDir
from elucidate.sampling import nfe
from elucidate.tuning import TunedSchedule
from elucidate.viz import save_image_grid

CHROMIUM = "/usr/bin/chromium"
EDGES = [0.002 * (80 / 0.002) ** (k / 8) for k in range(9)]


def metrics_lines(n: int = 50) -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for k in range(n):
        step = 100 * (k + 1)
        if k == 20:
            lines.append(json.dumps({"event": "resume", "step": step - 100}))
        if k % 10 == 9:
            lines.append(json.dumps({"event": "sample", "step": step, "path": f"samples/step-{step:08d}.png"}))
        centers = np.sqrt(np.array(EDGES[:-1]) * np.array(EDGES[1:]))
        by_sigma = 1 - 0.5 * np.exp(-np.log(centers / 0.5) ** 2 / 4) * (0.5 + k / n)
        counts = np.round(100 * np.exp(-(np.log(centers) + 1.2) ** 2 / 2.88)).astype(int)
        lines.append(json.dumps({
            "step": step, "kimg": step * 0.064, "loss": float(0.3 + math.exp(-k / 15) + rng.normal(0, 0.02)),
            "lr": 1e-3, "images_per_sec": 830.0, "seconds": step * 0.08, "sigma_edges": EDGES,
            "loss_by_sigma": [float(v) if c > 0 else None for v, c in zip(by_sigma, counts)],
            "count_by_sigma": counts.tolist(), "skipped_steps": 0}))
    return lines


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = RunDir(tmp_path / "run-<demo>")
    for folder in (run.samples, run.eval, run.sweep):
        folder.mkdir(parents=True)
    run.config.write_text("model:\n  type: EDM   # <script>alert('x')</script>\ntrain:\n  batch: 64\n")
    run.metrics.write_text("\n".join(metrics_lines()) + '\n{"step": 5100, "lo')
    g = torch.Generator().manual_seed(0)
    save_image_grid(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, run.sample_grid(100))
    save_image_grid(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, run.sample_grid(200), scale=1)
    save_image_grid(torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, run.trajectory)
    evals = {"fd_000100.json": {"metric": "fd_digits", "value": 9.75, "num": 1000, "sampler": "heun", "steps": 18,
                                "step": 100},
             "fd_000200.json": {"metric": "fd_digits", "value": 3.25, "num": 1000, "sampler": "heun", "steps": 18,
                                "step": 200},
             "nll.json": {"metric": "nll_bits_per_dim", "value": 1.5, "num": 500}}
    for name, obj in evals.items():
        (run.eval / name).write_text(json.dumps(obj))
    rows = ["sampler,steps,nfe,value"] + [f"{s},{n},{nfe(s, n)},{10 / n + (1.0 if s == 'euler' else 0.5):.4f}"
                                           for s in ("euler", "heun") for n in (4, 8, 16, 32)]
    (run.sweep / "samplers.csv").write_text("\n".join(rows) + "\n")
    return run.path


def eval_result(metric: str, value: float, step: int, **settings) -> dict:
    """A result as `elucidate eval` writes it (flat copies next to the full ``settings``)."""
    recorded = {"metric": metric, "features": "fd_digits", "reference": "digits", "num": 1000, "repeats": 1,
                "seeds": "0-999", "checkpoint": f"checkpoints/ckpt-{step:08d}.safetensors", "step": step,
                "sampling_precision": "fp32", "nfe": 35, "steps": 18, "sampler": "heun", "schedule": "auto",
                "s_churn": 0.0, "s_min": 0.0, "s_max": "inf", "s_noise": 1.0, "sigma_min": None, "sigma_max": None,
                "rho": None, "eta": None, "options": {}, "guidance": 1.0, "sigmas": None, "ema": True,
                "ema_std": None, "tuned_nfe": None, **settings}
    values = [value + 0.1 * k for k in range(recorded["repeats"])]
    flat = {k: recorded[k] for k in ("num", "repeats", "sampler", "steps", "nfe", "features", "reference", "step")}
    return {"metric": metric, "value": float(np.mean(values)), "values": values, "min": min(values),
            "mean": float(np.mean(values)), **flat, "seconds": 12.345678, "settings": recorded}


@pytest.fixture()
def long_run_dir(run_dir) -> Path:
    """``run_dir`` with long tables: 30 eval results (new and old formats, long settings), a likelihood result,
    a 60-row sweep with long numbers, and a tuned schedule."""
    run = RunDir(run_dir)
    long_ref = "/data/" + "a-very-long-folder-name/" * 4 + "reference-statistics-of-the-training-images.npz"
    for k in range(24):
        settings = {"repeats": 1 + k % 3, "num": 1000 * (1 + k % 2), "sampler": ["heun", "dpmpp_2m", "euler"][k % 3],
                    "steps": 5 + k, "nfe": 9 + k, "reference": long_ref if k % 4 == 0 else "digits",
                    "guidance": 1.0 + (k % 5) / 2}
        if k % 6 == 0:
            settings.update(tuned_nfe=9, sigmas=[80.0 / (1.7 ** i) for i in range(12)] + [0.0],
                            options={"order": 3, "variant": "bh2"})
        result = eval_result("fd_digits" if k % 2 else "kid", 498.88051229504117 / (k + 1), 100 * (k % 4), **settings)
        path = result_path(run.path, result)
        assert not path.exists()
        path.write_text(json.dumps(result))
    for k in range(4):  # results of earlier versions: flat, no settings
        (run.eval / f"pr-heun-18steps-{k}.json").write_text(json.dumps({
            "metric": "pr", "value": 0.6 + k / 100, "precision": 0.6 + k / 100, "recall": 0.412345678, "num": 500,
            "repeats": 1, "sampler": "heun", "steps": 18, "nfe": 35, "schedule": "auto", "s_churn": 0.0,
            "features": "fd_digits", "reference": "digits", "step": 100 * k,
            "checkpoint": f"/abs/path/to/the/run/checkpoints/ckpt-{100 * k:08d}.safetensors", "seconds": 3.0}))
    (run.eval / "likelihood-256-hutchinson-step200-0123456789.json").write_text(json.dumps({
        "metric": "bits_per_dim", "mean": 3.2101234567, "std": 0.51234567, "sem": 0.0321234, "num": 256,
        "num_dims": 64, "settings": {"trace": "hutchinson", "num_probes": 1, "probe": "rademacher", "method": "rk4",
                                     "steps": 64, "sigma_min": 0.002, "sigma_max": 80.0, "seed": 0,
                                     "dequantization": "uniform", "conditional": False, "scale": 0.12549019607843137,
                                     "checkpoint": "checkpoints/ckpt-00000200.safetensors", "step": 200,
                                     "num": 256, "ema": True}}))
    rows = ["sampler,steps,nfe,value,precision,recall,std"] + [
        f"{s},{n},{nfe(s, n)},{498.88051229504117 / n},{0.123456789 * n},{1 / n},{n * 1.0000001}"
        for s in ("euler", "heun", "dpmpp_2m", "dpmpp_3m_sde", "ipndm", "unipc") for n in range(1, 11)]
    (run.sweep / "fd_digits-vs-nfe.csv").write_text("\n".join(rows) + "\n")
    baselines = [{"sampler": "dpmpp_2m", "schedule": "karras", "options": {}, "heldout_error": 0.0512345},
                 {"sampler": "heun", "schedule": "exponential", "options": {}, "heldout_error": 0.0812345}]
    TunedSchedule(sampler="dpmpp_2m", sigmas=[80.0, 20.0, 5.0, 1.0, 0.2, 0.0], options={}, nfe=5,
                  tuning_error=0.028123456, heldout_error=0.0301234567, baselines=baselines,
                  model={"checkpoint": "ckpt-00000200.safetensors"}).save(run.tuned_schedule(5))
    return run.path


def data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_embeds_everything(run_dir):
    run = RunDir(run_dir)
    out = write_report(run_dir)
    assert out == run.report
    page = out.read_text(encoding="utf-8")
    images = data_uris(page)
    assert len(images) == page.count("<img") == 5  # loss, loss by sigma, samples, trajectory, sweep plot
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            assert im.width >= 37 and im.height >= 37  # the smallest is the unscaled 4x4 grid of 8x8
    latest = run.sample_grid(200).read_bytes()
    assert latest in images and run.sample_grid(100).read_bytes() not in images
    assert run.trajectory.read_bytes() in images
    assert 'class="pixelated"' in page  # the 8x8-digit grid is shown upscaled
    # no external resources, everything escaped
    assert not re.search(r'(src|href)="(?!data:)', page) and "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script>" not in page
    assert "run-&lt;demo&gt;" in page
    # tables: training summary, every eval result (one table per metric), the sweep CSV
    assert "<td class=\"num\">5000</td>" in page  # last training step (the truncated line is dropped)
    assert "3.25" in page and "9.75" in page and "nll_bits_per_dim" in page
    assert "fd_000100.json" in page and "fd_000200.json" in page
    assert page.count("<tr>") == (1 + 1) + (1 + 2) + (1 + 1) + (1 + 8)  # summary, fd_digits, nll, sweep
    assert "<td>heun</td>" in page and "<td class=\"num\">63</td>" in page
    assert page.count('<p class="na">No ') == 1 and "No tuned schedules yet" in page  # only that part is empty
    assert not list(run_dir.glob(".report.html.*"))


def test_report_custom_output_and_missing_parts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_report(empty, tmp_path / "out" / "r.html")
    page = out.read_text()
    assert out == tmp_path / "out" / "r.html" and "<img" not in page
    assert page.count('<p class="na">No ') == 7
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_report_survives_broken_artefacts(run_dir):
    run = RunDir(run_dir)
    run.sample_grid(300).write_bytes(b"not a png")
    (run.eval / "broken.json").write_text("{oops")
    run.metrics.write_text('{"event": "resume", "step": 0}\n')
    (run.sweep / "empty.csv").write_text("")
    page = render_report(run_dir)
    assert "latest sample grid: could not be shown" in page
    assert "could not read eval/broken.json" in page and "3.25" in page
    assert "No training records in metrics.jsonl yet" in page
    assert len(data_uris(page)) == 2  # trajectory + the samplers.csv plot


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); CI is not set")


def run_chromium(binary: str, profile: Path, *args: str, width: int = 1200) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},2400"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  var page = document.documentElement.scrollWidth;
  var wide = document.createElement("div");  // the check itself must be able to fail: a too-wide element
  wide.style.width = (window.innerWidth + 500) + "px";
  wide.style.height = "1px";  // an empty box of no height would not count
  document.querySelector("main").appendChild(wide);
  var forced = document.documentElement.scrollWidth;
  wide.remove();
  var probe = document.createElement("div");
  probe.id = "img-probe";
  probe.textContent = "images=" + imgs.length + " broken=" + broken + " scroll=" + page + " inner=" +
                      window.innerWidth + " client=" + document.documentElement.clientWidth + " forced=" + forced;
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.parametrize("width", [800, 1200])
def test_report_renders_in_headless_chromium(long_run_dir, tmp_path, width):
    """Every image loads and nothing overflows the page sideways (tables scroll inside their section), at 800
    and 1200 px, with a report of 32 eval results, a likelihood result, a 60-row sweep and a tuned schedule."""
    binary = chromium_or_skip()
    page = write_report(long_run_dir).read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"  # the report plus a probe that counts broken images and measures the page
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri(),
                       width=width)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<div id="img-probe">images=(\d+) broken=(\d+) scroll=(\d+) inner=(\d+) client=(\d+) '
                      r'forced=(\d+)</div>',
                      dom.stdout)
    assert match, "probe did not run: " + dom.stdout[-500:]
    images, broken, scroll, inner, client, forced = map(int, match.groups())
    assert (images, broken) == (7, 0)  # loss, loss by sigma, samples, trajectory, 2 sweep plots, tuned schedules
    assert inner == width and forced > inner  # the window is as wide as asked and the probe sees an overflow
    assert scroll <= min(inner, client), f"the page overflows sideways at {width} px: scrollWidth {scroll} > {client}"
    if width == 1200:
        shot = tmp_path / "report.png"
        result = run_chromium(binary, tmp_path / "profile2", f"--screenshot={shot}", "--virtual-time-budget=3000",
                              RunDir(long_run_dir).report.as_uri())
        assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
        with Image.open(shot) as im:
            assert im.width >= 800 and im.height >= 800, im.size
            assert np.asarray(im.convert("L"), dtype=np.float64).std() > 10


@pytest.mark.parametrize("value, text", [(498.88051229504117, "498.9"), (2.0, "2"), (5000, "5000"), (-3.25, "-3.25"),
                                         (0.0012345, "0.001234"), (1.2345e-5, "1.234e-5"), (123456.7, "123457"),
                                         (2.5e9, "2.5e9"), (0.0, "0"), (0.99996, "1"), (float("nan"), "nan"),
                                         (float("-inf"), "-inf"), (np.float32(0.1), "0.1"), (np.int64(7), "7"),
                                         (True, "true")])
def test_numbers_have_four_significant_digits(value, text):
    assert format_number(value) == text


def test_long_report_formats_numbers_and_lists_every_result(long_run_dir):
    page = render_report(long_run_dir)
    run = RunDir(long_run_dir)
    assert len(run.eval_results()) == 3 + 24 + 4 + 1  # the fixture's 3, then 24 new, 4 old, 1 likelihood
    for path in run.eval_results():  # every result file is listed
        assert _e(path.name) in page, path.name
    # numbers to 4 significant digits, in tables, cards and sweep CSV cells alike
    assert "498.88051229504117" not in page and "498.9" in page and "49.89" in page
    assert not re.search(r"\d\.\d{6,}", page), re.search(r".{40}\d\.\d{6,}.{40}", page)[0]
    # each metric in its own table, its value under its own name; likelihood under bits/dim, not "value"
    for metric in ("fd_digits", "kid", "pr", "bits_per_dim"):
        assert f"<h3>{metric}</h3>" in page
    assert "<th>bits_per_dim (bits/dim)</th>" in page and "3.21" in page and "<th>s.e.m.</th>" in page
    assert "<th>precision</th>" not in page.split("<h3>pr</h3>")[0]  # kid/fd tables have no precision column
    # settings as key=value text, never raw JSON
    assert "repeats=2" in page and "guidance=1.5" in page and "tuned_nfe=9" in page and "order=3" in page
    assert "(13 values)" in page and '{&quot;' not in page and '{"' not in page.split("<style>")[0] + \
        page.split("</style>")[1]
    # the tuned schedule: its figure, sampler, NFE and score
    section = page.split('id="tuned"')[1]
    assert "dpmpp_2m" in section and "0.03012" in section and "data:image/png;base64," in section
    assert "dpmpp_2m/karras: 0.05123" in section


def _e(text: str) -> str:
    import html
    return html.escape(text, quote=True)


def test_each_empty_section_names_its_command(tmp_path):
    run = tmp_path / "my run"
    run.mkdir()
    sections = dict(re.findall(r'<section id="(\w+)"><h2>[^<]*</h2>(.*?)</section>', render_report(run)))
    assert set(sections) == {"config", "training", "samples", "trajectory", "eval", "sweep", "tuned"}
    quoted = _e(f"'{run}'")
    for name, body in sections.items():
        assert body.startswith('<p class="na">No ') and "<code>elucidate " in body and quoted in body, (name, body)
    assert f"<code>elucidate tune {quoted} --nfe 9</code>" in sections["tuned"]
    assert f"<code>elucidate sweep {quoted} --metric fid --inception FILE</code>" in sections["sweep"]  # no config
    (run / "config.yaml").write_text("data:\n  dataset: digits\n")
    page = render_report(run)
    assert f"<code>elucidate eval {quoted} --metric fd_digits</code>" in page
    assert f"<code>elucidate likelihood {quoted}</code>" in page
