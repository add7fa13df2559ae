"""The demo run itself: trains EDM on the real digits and its samples must be recognizable."""
import pytest

from elucidate.cli.demo import run_demo
from elucidate.run import RunDir


@pytest.mark.slow
def test_demo_digits_are_recognizable(tmp_path):
    # >= 80 % of 500 samples classified with confidence >= 0.8 by the bundled classifier
    # (trained on the real digits), and all 10 classes present.
    report = run_demo(tmp_path / "demo", progress=False)
    assert report["confident_fraction"] >= 0.8, report
    assert report["classes_present"] == 10, report
    run = RunDir(tmp_path / "demo")
    for path in (run.final_samples, run.trajectory, run.demo_report, run.config, run.metrics):
        assert path.stat().st_size > 0, path
