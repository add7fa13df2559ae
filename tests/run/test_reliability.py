"""Run safety: one writer per run, damaged checkpoints set aside, write errors as one line, kills at
random moments resume bit-exactly, divergence stops training with the last good state kept."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import elucidate.run.checkpoint as ckpt_module
import elucidate.runtime.files as fileio
from elucidate.config import load_config, parse_config
from elucidate.errors import ConfigError, UserError
from elucidate.run.checkpoint import (
    CheckpointDamaged,
    CheckpointWarning,
    check_run_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from elucidate.run.lock import RunLock, RunLocked, run_lock
from elucidate.run.model import load_run, resolve_checkpoint
from elucidate.run.rundir import RunDir
from elucidate.runtime.files import WriteError, append_text
from elucidate.training.diffusion import Trainer
from elucidate.training.loop import TrainingStopped
from elucidate.viz.training import read_metrics


def run_config(tiny_config, **training) -> dict:
    """The tiny run (``tiny_config``) on 200 digits with a 2-level 16-channel U-Net (checkpoints of ~2 MB), 6 steps
    of 16 images, a checkpoint every 3 steps, a metrics line every step; ``training`` updates the training section."""
    return tiny_config(data={"max_size": 200}, network={"model_channels": 16, "channel_mult": [1, 2]},
                       training={"steps": 6, "batch_size": 16, "lr_rampup": 64, "ema_halflife": 200,
                                 "checkpoint_every": 3, "log_every": 1, "seed": 5, **training},
                       sampling={"steps": 4})


def trainer(raw: dict, run: Path) -> Trainer:
    return Trainer(parse_config(raw), run, progress=False, log=lambda *a: None)


def resume(run: Path, log=lambda *a: None) -> Trainer:
    """A trainer of ``run`` with the config the run was trained with (its config.yaml)."""
    return Trainer(load_config(RunDir(run).config), run, progress=False, log=log)


def train_command(cfg: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "elucidate", "train", str(cfg), "--out", str(run), "--no-progress"]


def tensors_of(path: Path) -> dict:
    return load_checkpoint(path)[0]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def metrics_lines(run: Path) -> list[dict]:
    """Every line of the run's metrics file, in file order (events included)."""
    return [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]


# --- one writer per run ----------------------------------------------------------------------------
def test_run_lock_is_exclusive_names_its_holder_and_dies_with_it(env, tmp_path):
    run = tmp_path / "run"
    with run_lock(run, what="vae training") as lock:
        assert json.loads(RunDir(run).lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"in use by vae training \\(pid {os.getpid()} on "):
            RunLock(run).acquire()
        assert lock.held
    assert not RunDir(run).lock.exists()  # a clean release leaves nothing behind
    RunLock(run).acquire().release()

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from elucidate.run.lock import RunLock; "
                               f"lock = RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunDir(run).lock.exists()  # SIGKILL leaves the file, but not the lock
    with run_lock(run):
        pass


def test_a_second_writer_exits_at_once_naming_the_holder(tiny_config, write_config, cli_main, env, tmp_path):
    """While `elucidate train` in another process (paused mid-run) holds the run, a second `elucidate train` of it
    exits 2 with one line naming the holder, and the first run finishes unharmed."""
    cfg = write_config(tiny_config(training={"steps": 50, "checkpoint_every": 2, "keep_checkpoints": 3}),
                       tmp_path / "cfg.yaml")
    run = RunDir(tmp_path / "run")
    first = subprocess.Popen(train_command(cfg, run.path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not run.list_checkpoints() and first.poll() is None:
        time.sleep(0.01)
    first_running = first.poll() is None
    if first_running:  # pause the first writer so it still holds the run while the second tries
        first.send_signal(signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        code, lines = cli_main(["train", cfg, "--out", run, "--no-progress"])
        seconds = time.perf_counter() - t0
    finally:
        if first_running:
            first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first_running, "the first run ended before the second writer was refused"
    assert code == 2 and len(lines) == 1, lines
    assert f"is in use by training (pid {first.pid} on " in lines[0] and "elucidate train" in lines[0]
    assert first.returncode == 0, err
    assert run.latest_checkpoint() == run.checkpoint(50)
    print(f"second writer refused after {seconds:.2f} s")


# --- kills at random moments -----------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_kills_at_random_moments_then_resume_is_bit_identical(tiny_config, write_config, cli_main, env, tmp_path):
    """`elucidate train` interrupted four times (SIGKILL while a checkpoint is written, SIGKILL at two random
    moments, SIGTERM), then run to the end, ends with the weights of an uninterrupted run. The interrupted runs
    are separate processes; the uninterrupted run and the last one run here, on one thread like them."""
    cfg = write_config(run_config(tiny_config, steps=50, checkpoint_every=2, keep_checkpoints=3, log_every=2),
                       tmp_path / "cfg.yaml")
    reference = RunDir(tmp_path / "reference")
    code, err = cli_main(["train", cfg, "--out", reference, "--no-progress"])
    assert code == 0, err
    rng = random.Random(12)
    run = tmp_path / "killed"
    folder = RunDir(run).checkpoints
    kills = []
    for mode in ("during-write", "random", "random", "sigterm"):
        before = list_checkpoints(folder)[-1:]
        proc = subprocess.Popen(train_command(cfg, run), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 120
        if mode == "during-write":  # the moment a checkpoint temp file appears (after a first checkpoint)
            while time.time() < deadline and proc.poll() is None and not (list_checkpoints(folder) and any(
                    n.startswith(".ckpt-") for n in temp_files(folder))):
                time.sleep(0.0005)
        else:  # some time after the first new checkpoint of this round
            while time.time() < deadline and proc.poll() is None and list_checkpoints(folder)[-1:] == before:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"{mode}: the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
        newest = list_checkpoints(folder)[-1]
        kills.append((mode, newest.name, temp_files(folder)))
        if mode == "sigterm":  # finishes the step and checkpoints it
            assert proc.returncode == 130 and f"checkpoint: {newest}" in out
        assert newest.name != "ckpt-00000050.safetensors", kills
    code, err = cli_main(["train", cfg, "--out", run, "--no-progress"])
    assert code == 0, err
    assert_same_tensors(tensors_of(reference.latest_checkpoint()), tensors_of(list_checkpoints(folder)[-1]))
    assert temp_files(folder) == [] and not RunDir(run).lock.exists()
    records = read_metrics(RunDir(run).metrics)
    assert [r["step"] for r in records] == list(range(2, 51, 2))
    print("interruptions (mode, newest checkpoint, temp files left):", kills)


# --- damaged checkpoints ---------------------------------------------------------------------------
def _small_checkpoint(path: Path, **meta) -> Path:
    net = torch.nn.Linear(3, 2)
    return save_checkpoint(path, net=net, ema=net, optimizer=None, meta={"step": 7, "config": {}, "data": {}, **meta})


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero_tail(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:-16] + bytes(16))


def _bad_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8] = ord("X")
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "not a complete safetensors file"),
    (lambda p: p.write_bytes(b""), "not a complete safetensors file"),
    (_bad_header, "not a complete safetensors file"),
    (_zero_tail, "does not match the CRC-32"),
    (lambda p: p.rename(p.with_name("ckpt-00000008.safetensors")), "holds step 7, not the step 8"),
])
def test_each_kind_of_damage_is_named(tmp_path, damage, reason):
    path = _small_checkpoint(tmp_path / "ckpt-00000007.safetensors")
    damage(path)
    path = list_checkpoints(tmp_path)[-1]
    with pytest.raises(CheckpointDamaged, match=reason):
        check_run_checkpoint(path)
        load_checkpoint(path)


def test_metadata_problems_are_damage_but_a_newer_format_is_not(tmp_path):
    a = tmp_path / "ckpt-00000007.safetensors"
    save_file({"x": torch.zeros(2)}, str(a), metadata={"elucidate": "{not json"})
    with pytest.raises(CheckpointDamaged, match="not a JSON object"):
        read_header(a)
    save_file({"x": torch.zeros(2)}, str(a))
    with pytest.raises(CheckpointDamaged, match="no elucidate metadata"):
        read_header(a)
    with pytest.raises(CheckpointDamaged, match="no 'config'"):
        check_run_checkpoint(_small_checkpoint(a, config=None))
    save_file({"x": torch.zeros(2)}, str(a), metadata={"elucidate": json.dumps({"format": "elucidate-checkpoint/9"})})
    with pytest.raises(UserError, match="format") as info:
        read_header(a)
    assert not isinstance(info.value, CheckpointDamaged)  # a newer version's file is never moved aside


def test_truncated_newest_checkpoint_is_set_aside_and_resume_is_exact(trained_run, trained_copy):
    """The session's run (checkpoints at steps 3 and 6) with its newest checkpoint cut in half."""
    run = trained_copy
    newest = RunDir(run).checkpoint(6)
    _truncate(newest)
    size = newest.stat().st_size

    # readers fall back with a warning and move nothing
    with pytest.warns(CheckpointWarning, match=r"ckpt-00000006.safetensors is damaged: .*using ckpt-00000003"
                                               r".safetensors \(step 3\)"):
        assert load_run(run).step == 3
    with pytest.warns(CheckpointWarning):
        assert resolve_checkpoint(run).name == "ckpt-00000003.safetensors"
    with pytest.raises(CheckpointDamaged, match="ckpt-00000006.safetensors is damaged"):
        load_run(newest)  # named explicitly: no fallback
    assert newest.stat().st_size == size

    # training moves it aside, resumes from step 3 and ends where the uninterrupted run did
    logs = []
    t = resume(run, log=logs.append)
    assert t.step == 3 and any("ckpt-00000006.safetensors is damaged" in line and "moved it to" in line
                               for line in logs)
    assert (RunDir(run).damaged / "ckpt-00000006.safetensors").stat().st_size == size
    t.train()
    assert_same_tensors(tensors_of(RunDir(trained_run).checkpoint(6)), tensors_of(newest))
    assert {"event": "resume", "step": 3, "checkpoint": "ckpt-00000003.safetensors",
            "damaged": ["ckpt-00000006.safetensors"]} in metrics_lines(run)


def test_only_damaged_checkpoints_refuse_to_start_over(trained_copy):
    run = trained_copy
    for path in RunDir(run).list_checkpoints():
        _zero_tail(path)
    with pytest.raises(UserError, match="has no usable checkpoint: .*ckpt-00000006.*1 older ones are damaged"):
        load_run(run)
    for _ in range(2):  # the first attempt moves both aside, the second finds only damaged ones: both refuse
        with pytest.raises(UserError, match="has only damaged checkpoints"):
            resume(run)
    assert len(list(RunDir(run).damaged.iterdir())) == 2
    assert RunDir(run).metrics.exists()  # nothing was started over


def test_a_checkpoint_that_does_not_fit_the_network_is_one_line(trained_copy, cli_main, tmp_path):
    run = trained_copy
    path = RunDir(run).checkpoint(6)
    tensors, meta = load_checkpoint(path)
    key = next(k for k in tensors if k.startswith("ema.") and tensors[k].ndim == 4)
    tensors[key] = torch.zeros(3, *tensors[key].shape[1:])
    del meta["crc32"]
    save_file(tensors, str(path), metadata={"elucidate": json.dumps(meta)})
    code, lines = cli_main(["sample", run, "--seeds", "0-1", "--out", tmp_path / "x.png"])
    assert code == 2 and len(lines) == 1
    assert f"does not fit the configured network: {key} is [3, " in lines[0]
    with pytest.raises(UserError, match=f"does not fit the configured network: {key}"):
        resume(run)
    assert path.exists() and not RunDir(run).damaged.exists()  # refused, not moved


# --- write errors ----------------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_write_is_one_line(tiny_config, write_config, cli_main, tmp_path,
                                                           monkeypatch):
    real = ckpt_module.save_file

    def full_disk(tensors, filename, metadata=None):
        if "00000006" not in filename:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"partial data")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    cfg = write_config(run_config(tiny_config), tmp_path / "cfg.yaml")
    run = RunDir(tmp_path / "run")
    code, lines = cli_main(["train", cfg, "--out", run, "--no-progress"])
    assert code == 2 and lines == [f"elucidate train: error: cannot write {run.checkpoint(6)}: "
                                   f"[Errno 28] No space left on device"]
    assert list(run.checkpoints.iterdir()) == [run.checkpoint(3)]
    assert load_checkpoint(run.checkpoint(3))[1]["step"] == 3
    assert not run.lock.exists()


def test_a_real_os_write_error_stops_training_with_one_line(tiny_config, write_config, env, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: a checkpoint is ~180 KB, the limit 64 KB)."""
    import resource

    cfg = write_config(tiny_config(training={"steps": 6, "checkpoint_every": 3, "log_every": 1}), tmp_path / "cfg.yaml")
    run = RunDir(tmp_path / "run")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    r = subprocess.run(train_command(cfg, run.path), env=env, capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"elucidate train: error: cannot write {run.checkpoint(3)}: [Errno 27] File too large"]
    assert list(run.checkpoints.iterdir()) == []  # no partial file, no temp file
    assert [r["step"] for r in read_metrics(run.metrics)] == [1, 2, 3]


def test_a_directory_made_read_only_mid_run(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = trainer(run_config(tiny_config, steps=8, checkpoint_every=2), run)
    folder = RunDir(run).checkpoints
    save = t.save

    def save_then_lock_folder():
        path = save()
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):  # root: chmod does not bind, so fake what the kernel would say
            real = fileio.tempfile.mkstemp

            def refuse(*a, dir=None, **k):
                if Path(dir) == folder:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                return real(*a, dir=dir, **k)
            monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
        return path

    t.save = save_then_lock_folder
    try:
        with pytest.raises(WriteError) as info:
            t.train()
    finally:
        folder.chmod(0o755)
    assert str(info.value) == f"cannot write {folder}/ckpt-00000004.safetensors: [Errno 13] Permission denied"
    assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
    assert [p.name for p in folder.iterdir()] == ["ckpt-00000002.safetensors"]
    with run_lock(run):  # released
        pass


def test_a_failed_append_leaves_no_partial_line_and_readers_skip_one(env, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n')
    child = ("import resource, signal, sys; from elucidate.runtime.files import append_text, WriteError\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({path.stat().st_size + 10},) * 2)\n"
             f"try:\n    append_text({str(path)!r}, '{{\"step\": 2, \"loss\": ' + '1' * 100 + '}}\\n')\n"
             "except WriteError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == f"cannot write {path}: [Errno 27] File too large", r.stderr
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'  # cut back: no partial line

    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a partial line (e.g. power loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial last line is skipped silently (the trainer may be mid-write)
        assert [r["step"] for r in read_metrics(path)] == [1]
    append_text(path, '{"step": 3, "loss": 0.25}\n')  # starts on a new line
    assert path.read_text().splitlines()[-1] == '{"step": 3, "loss": 0.25}'
    with pytest.warns(UserWarning, match="not valid JSON"):  # the partial line is now in the middle
        assert [r["step"] for r in read_metrics(path)] == [1, 3]


# --- diverged models -------------------------------------------------------------------------------
def test_max_bad_steps_stops_training_keeping_the_last_good_state(tiny_config, tmp_path):
    run = RunDir(tmp_path / "run")
    t = trainer(run_config(tiny_config, steps=20, checkpoint_every=4, max_bad_steps=3, keep_checkpoints=1), run.path)
    original = t.net.forward

    def poisoned(x, c_noise, **kw):  # steps 6, 7, 8 (0-based) diverge
        out = original(x, c_noise, **kw)
        return out * float("nan") if t.step >= 6 else out

    t.net.forward = poisoned
    with pytest.raises(TrainingStopped, match=r"training stopped at step 9: 3 steps in a row had a non-finite "
                                              r"gradient .*ckpt-00000006.safetensors holds the last good state "
                                              r"\(step 6\)"):
        t.train()
    assert run.list_checkpoints() == [run.checkpoint(6)]  # written on stopping; none during the bad steps
    tensors, meta = load_checkpoint(run.checkpoint(6))
    assert meta["step"] == 6 and meta["skipped_steps"] == 0 and meta["bad_streak"] == 0
    for name, p in t.net.state_dict().items():  # skipped steps changed nothing
        assert torch.equal(tensors["net." + name], p), name
    assert {"event": "stopped", "step": 9, "bad_steps": 3, "last_good_step": 6} in metrics_lines(run.path)

    # max_bad_steps may change on resume; training goes on from the last good state
    resumed = trainer(run_config(tiny_config, steps=8, checkpoint_every=4, max_bad_steps=None, keep_checkpoints=1),
                      run.path)
    assert resumed.step == 6 and resumed.train()["step"] == 8


def test_max_bad_steps_validation(tiny_config):
    assert parse_config(tiny_config(training={"max_bad_steps": None})).training.max_bad_steps is None
    assert parse_config(tiny_config()).training.max_bad_steps == 100
    for bad in (0, -1, 2.5, "many", True):
        with pytest.raises(ConfigError, match="training.max_bad_steps"):
            parse_config(tiny_config(training={"max_bad_steps": bad}))


# --- non-finite samples ------------------------------------------------------------------------------
def test_check_finite_counts_and_names_the_seeds():
    from elucidate.run.outputs import NonFiniteSamples, check_finite

    x = torch.zeros(8, 1, 2, 2)
    check_finite(x, range(10, 18))
    x[1, 0, 0, 0], x[5, 0, 1, 1] = float("nan"), float("-inf")
    with pytest.raises(NonFiniteSamples, match=r"^2 of 8 samples contain NaN/Inf \(seeds 11, 15\)"):
        check_finite(x, range(10, 18))


@pytest.mark.parametrize("verb", ["sample", "eval"])
def test_nonfinite_samples_exit_2_and_write_nothing(trained_copy, cli_main, tmp_path, monkeypatch, verb):
    from elucidate.run.model import LoadedRun

    real = LoadedRun.sample

    def diverged(*args, **kwargs):  # the real sampler, then two images poisoned as a diverged model would
        x = real(*args, **kwargs)
        x[:2] = float("nan")
        return x

    monkeypatch.setattr(LoadedRun, "sample", diverged)
    out = tmp_path / "s.npz"
    argv = (["sample", trained_copy, "--seeds", "0-7", "--steps", "2", "--out", out] if verb == "sample" else
            ["eval", trained_copy, "--num", "8", "--steps", "2", "--ref", "digits"])
    code, err = cli_main(argv)
    errors = [line for line in err if "error:" in line or "Traceback" in line]  # (the rest: progress bars)
    assert code == 2 and len(errors) == 1 and "2 of 8 samples contain NaN/Inf" in errors[0], err
    assert not out.exists() and not RunDir(trained_copy).eval.exists()
