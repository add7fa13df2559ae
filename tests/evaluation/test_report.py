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

from elucidate.evaluation.report import render_report, write_report
from elucidate.run import RunDir
from elucidate.sampling import nfe
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
    # tables: training summary, latest eval per metric, the sweep CSV
    assert "<td class=\"num\">5000</td>" in page  # last training step (the truncated line is dropped)
    assert "3.25" in page and "9.75" not in page and "nll_bits_per_dim" in page and "fd_000200.json" in page
    assert page.count("<tr>") == (1 + 1) + (1 + 2) + (1 + 8)  # summary, eval, sweep (header + rows)
    assert "<td>heun</td>" in page and "<td class=\"num\">63</td>" in page
    assert "not available yet" not in page
    assert not list(run_dir.glob(".report.html.*"))


def test_report_custom_output_and_missing_parts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_report(empty, tmp_path / "out" / "r.html")
    page = out.read_text()
    assert out == tmp_path / "out" / "r.html" and "<img" not in page
    assert page.count("not available yet") == 6
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
    assert "training records in metrics.jsonl: not available yet" in page
    assert len(data_uris(page)) == 2  # trajectory + the samplers.csv plot


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); CI is not set")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,2400"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  var probe = document.createElement("div");
  probe.id = "img-probe";
  probe.textContent = "images=" + imgs.length + " broken=" + broken;
  document.body.appendChild(probe);
});
</script>"""


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    binary = chromium_or_skip()
    page = write_report(run_dir).read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"  # the report plus a probe that counts broken images after load
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<div id="img-probe">images=(\d+) broken=(\d+)</div>', dom.stdout)
    assert match, "probe did not run: " + dom.stdout[-500:]
    assert (int(match[1]), int(match[2])) == (5, 0)
    shot = tmp_path / "report.png"
    result = run_chromium(binary, tmp_path / "profile2", f"--screenshot={shot}", "--virtual-time-budget=3000",
                          RunDir(run_dir).report.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.width >= 800 and im.height >= 800, im.size
        assert np.asarray(im.convert("L"), dtype=np.float64).std() > 10
