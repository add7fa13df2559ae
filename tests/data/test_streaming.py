"""Streamed data: memory-mapped arrays and lazily decoded folders/zips give exactly the in-memory batches, read ahead
in worker processes or not; training on them resumes bit-exactly (also after SIGKILL); ``pack`` round-trips; a
memory-mapped dataset is built without reading it into memory."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elucidate.cli.data import pack_images
from elucidate.data import ArrayDataset, DataError, ImageDataset, ImageFolderDataset, ZipImageDataset, build_dataset
from elucidate.data.images import FolderFiles, load_images
from elucidate.data.loader import BatchPrefetcher
from elucidate.data.mapped import MappedStore
from elucidate.run import RunDir, load_checkpoint
from elucidate.runtime.rng import batch_indices

CLASSES = ("cat", "dog")


def png_folder(root: Path, count: int = 12, mixed_size: bool = True) -> Path:
    """``count`` RGB PNGs in two class folders (sizes differ when ``mixed_size``: resolution/center_crop needed)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (10, 14) if not mixed_size or i % 2 else (12, 12)
        path = root / CLASSES[i % 2] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root


def zipped(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder).as_posix())
    return out


def same_batches(a: ImageDataset, b: ImageDataset, seed: int = 3) -> None:
    assert len(a) == len(b) and a.normalizer == b.normalizer
    for step in range(4):
        indices = batch_indices(seed, step, 7, len(a))
        (xa, la), (xb, lb) = a.get_batch(indices), b.get_batch(indices)
        assert torch.equal(xa, xb) and torch.equal(la, lb)
    assert torch.equal(a.images, b.images)


# ------------------------------------------------------------------------------------------------ same batches
@pytest.mark.parametrize("dtype, normalize", [("uint8", "standardize"), ("float64", "minmax"), ("float32", "auto")])
def test_memory_mapped_array_gives_the_in_memory_batches(tmp_path, dtype, normalize):
    rng = np.random.default_rng(1)
    array = (rng.integers(0, 256, (20, 10, 14, 3)) if dtype == "uint8" else rng.normal(size=(20, 10, 14, 3)))
    array = array.astype(dtype)
    np.save(tmp_path / "a.npy", array)  # NHWC: transposed per batch
    np.savez(tmp_path / "stored.npz", images=array, labels=np.arange(20) % 3)  # a stored member: mapped too
    np.savez_compressed(tmp_path / "packed.npz", images=array, labels=np.arange(20) % 3)  # compressed: in memory
    options = dict(resolution=8, center_crop=True, xflip=True, normalize=normalize, max_size=17)
    mapped = ArrayDataset(tmp_path / "a.npy", **options)
    stored = ArrayDataset(tmp_path / "stored.npz", key="images", labels_key="labels", **options)
    memory = ArrayDataset(tmp_path / "packed.npz", key="images", labels_key="labels", **options)
    assert isinstance(mapped.store, MappedStore) and isinstance(stored.store, MappedStore) and not memory.streamed
    assert mapped.streamed and mapped.stored_dtype == memory.stored_dtype and mapped.num_images == 17
    same_batches(stored, memory)
    memory.labels = None
    same_batches(mapped, memory)
    assert "memory-mapped" in mapped.describe() and mapped.stored_range() == memory.stored_range()


def test_memory_mapped_float_checks_stream(tmp_path):
    array = np.zeros((2000, 1, 4, 4), dtype=np.float64)
    array[1500, 0, 1, 1], array[1700, 0, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", array)
    with pytest.raises(DataError, match=r"2 non-finite values \(NaN/Inf\), first in item 1500"):
        ArrayDataset(tmp_path / "nan.npy")
    np.save(tmp_path / "big.npy", np.full((3, 1, 4, 4), 1e300))
    with pytest.raises(DataError, match="overflow float32"):
        ArrayDataset(tmp_path / "big.npy")
    np.save(tmp_path / "short.npy", np.zeros((10, 1, 4, 4), np.uint8))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:-40])
    with pytest.raises(DataError, match="short.npy"):
        ArrayDataset(tmp_path / "short.npy")


def test_lazily_decoded_folder_and_zip_give_the_in_memory_batches(tmp_path):
    folder = png_folder(tmp_path / "pngs")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    options = dict(resolution=(8, 6), center_crop=True, xflip=True, normalize="standardize")
    pixels = load_images(names, FolderFiles(folder).read, str(folder), resolution=(8, 6), center_crop=True)
    labels = torch.tensor([CLASSES.index(n.split("/")[0]) for n in names])
    memory = ImageDataset(pixels, labels, name="pngs", xflip=True, normalize="standardize")
    lazy = ImageFolderDataset(folder, labels=True, **options)
    assert lazy.streamed and lazy.class_names == list(CLASSES)
    same_batches(lazy, memory)
    archive = ZipImageDataset(zipped(folder, tmp_path / "pngs.zip"), labels=True, **options)
    same_batches(archive, memory)
    # mixed sizes and modes are found from the headers, without decoding
    with pytest.raises(DataError, match="mixed image sizes.*set resolution"):
        ImageFolderDataset(folder)
    Image.fromarray(np.zeros((10, 14), np.uint8)).save(folder / "cat" / "gray.png")
    with pytest.raises(DataError, match="mixed image modes.*gray.png"):
        ImageFolderDataset(folder, resolution=8)
    assert ImageFolderDataset(folder, resolution=8, channels=1).channels == 1


def test_workers_read_the_same_batches_and_report_bad_files_in_one_line(tmp_path):
    folder = png_folder(tmp_path / "pngs", count=16, mixed_size=False)
    dataset = ImageFolderDataset(folder, labels=True, xflip=True)
    part = slice(2, 6)  # a DDP rank's slice: each process reads only its own

    def indices_of(step):
        return batch_indices(7, step, 8, len(dataset))[part]

    ahead = BatchPrefetcher(dataset, indices_of, end=8, workers=2)
    try:
        for step in [0, 1, 2, 5, 6, 7, 3]:  # out of sequence: restarts there (a resume)
            (xa, la), (xb, lb) = ahead.get(step, indices_of(step)), dataset.get_batch(indices_of(step))
            assert torch.equal(xa, xb) and torch.equal(la, lb)
        assert ahead._iter is not None  # the batches came from the workers
        (folder / "cat" / "000.png").write_bytes((folder / "dog" / "001.png").read_bytes()[:100])  # damaged data
        with pytest.raises(DataError) as info:
            for step in range(8):
                ahead.get(step, indices_of(step))
        assert "000.png" in str(info.value) and "\n" not in str(info.value) and "Traceback" not in str(info.value)
    finally:
        ahead.close()


# ------------------------------------------------------------------------------------------------ pack
def test_pack_round_trips_a_folder(tmp_path, cli_main):
    folder = png_folder(tmp_path / "pngs")
    code, _ = cli_main(["pack", folder, "--out", tmp_path / "data.npz", "--resolution", 8, "--center-crop",
                        "--labels"])
    assert code == 0 and not list(tmp_path.glob(".data.npz*"))  # no temp file left behind
    section = {"dataset": "npz", "path": str(tmp_path / "data.npz"), "key": "images", "labels_key": "labels"}
    packed, folder_ds = build_dataset(section), ImageFolderDataset(folder, resolution=8, center_crop=True,
                                                                   labels=True)
    assert isinstance(packed.store, MappedStore)
    assert torch.equal(packed.images, folder_ds.images) and torch.equal(packed.labels, folder_ds.labels)
    same = build_dataset({**section, "xflip": True})
    assert torch.equal(same.get_batch(torch.arange(24))[0],
                       ImageFolderDataset(folder, resolution=8, center_crop=True, xflip=True).get_batch(
                           torch.arange(24))[0])
    info = pack_images(zipped(folder, tmp_path / "p.zip"), tmp_path / "images.npy", resolution=8, center_crop=True,
                       progress=False)
    assert info["data"] == {"dataset": "npz", "path": str(tmp_path / "images.npy")}
    assert torch.equal(ArrayDataset(tmp_path / "images.npy").images, folder_ds.images)
    code, err = cli_main(["pack", folder, "--out", tmp_path / "x.npy", "--resolution", 8, "--labels"])
    assert code == 2 and len(err) == 1 and "x.npy" in err[0] and ".npz" in err[0]
    assert not (tmp_path / "x.npy").exists()


# ------------------------------------------------------------------------------------------------ training
def _train(cli_main, write_config, config, out):
    assert cli_main(["train", write_config(config, out.parent / f"{out.name}.yaml"), "--out", out,
                     "--no-progress"])[0] == 0
    return load_checkpoint(RunDir(out).latest_checkpoint())


def _equal(a, b):
    assert a[0].keys() == b[0].keys() and a[1]["step"] == b[1]["step"]
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["npy", "folder"])
def test_training_on_streamed_data_resumes_exactly(kind, tmp_path, tiny_config, write_config, cli_main):
    """Streamed and in-memory data train the same weights; read in workers or not; resumed or not."""
    if kind == "npy":
        array = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
        np.save(tmp_path / "d.npy", array)
        np.savez_compressed(tmp_path / "d.npz", images=array)  # loaded into memory
        data = {"dataset": "npz", "path": str(tmp_path / "d.npy"), "xflip": True, "workers": 2}
        other = {**data, "path": str(tmp_path / "d.npz")}
    else:
        data = {"dataset": "folder", "path": str(png_folder(tmp_path / "pngs", 20)), "resolution": 8,
                "center_crop": True, "labels": True, "channels": 1, "workers": 2}
        other = {**data, "workers": 0}  # decoded in the training process
    assert build_dataset(data).streamed and build_dataset(other).streamed == (kind == "folder")
    config = tiny_config(data=data, training={"steps": 4, "checkpoint_every": 2})
    full = _train(cli_main, write_config, config, tmp_path / "full")
    _equal(full, _train(cli_main, write_config, tiny_config(data=other, training=config["training"]),
                        tmp_path / "other"))
    _train(cli_main, write_config, tiny_config(data=data, training={"steps": 2, "checkpoint_every": 2}),
           tmp_path / "resumed")
    _equal(full, _train(cli_main, write_config, config, tmp_path / "resumed"))
    # data.workers may change when resuming (it changes how batches are read, never which)
    _train(cli_main, write_config, tiny_config(data=data, training={"steps": 2, "checkpoint_every": 2}),
           tmp_path / "rereading")
    _equal(full, _train(cli_main, write_config, tiny_config(data={**data, "workers": 0}, training=config["training"]),
                        tmp_path / "rereading"))


@pytest.mark.usefixtures("one_thread")  # as the killed process (OMP_NUM_THREADS=1): the same arithmetic
def test_killed_on_streamed_data_then_resumed_is_bit_exact(tiny_config, write_config, cli_main, env, tmp_path):
    data = {"dataset": "folder", "path": str(png_folder(tmp_path / "pngs", 20)), "resolution": 8, "center_crop": True,
            "channels": 1, "workers": 1}
    raw = tiny_config(data=data, training={"steps": 40, "checkpoint_every": 5, "log_every": 5})
    cfg = write_config(raw, tmp_path / "cfg.yaml")
    full, killed = RunDir(tmp_path / "full"), RunDir(tmp_path / "killed")
    assert cli_main(["train", cfg, "--out", full, "--no-progress"])[0] == 0
    command = [sys.executable, "-m", "elucidate", "train", str(cfg), "--out", str(killed), "--no-progress"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not killed.list_checkpoints():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = killed.list_checkpoints()
    assert at_kill and at_kill[-1] != killed.checkpoint(40), "the run finished before it could be killed"
    code, err = cli_main(["train", cfg, "--out", killed, "--no-progress"])
    assert code == 0, err
    _equal(load_checkpoint(full.latest_checkpoint()), load_checkpoint(killed.latest_checkpoint()))
    records = [json.loads(line) for line in killed.metrics.read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in records)


# ------------------------------------------------------------------------------------------------ memory
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    pytest.skip(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_memory_mapped_dataset_is_not_read_into_memory(tmp_path):
    for rows in (100, 3200):  # 3200 rows: 200 MB uint8 (NHWC); sparse, so writing it is quick
        array = np.lib.format.open_memmap(tmp_path / f"{rows}.npy", mode="w+", dtype=np.uint8, shape=(rows, 64, 64, 16))
        array[::7] = 200
        array.flush()
        del array

    def build_and_read(rows: int) -> torch.Tensor:
        dataset = ArrayDataset(tmp_path / f"{rows}.npy", normalize="standardize", xflip=True)  # a statistics pass
        assert dataset.streamed
        return dataset.get_batch(batch_indices(0, 0, 64, len(dataset)))[0]

    build_and_read(100)  # the same code once, small: the libraries' pages it touches count in the RSS too
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kb("VmHWM")
    x = build_and_read(3200)
    grown_mb = (_rss_kb("VmHWM") - before) / 1024
    assert x.shape == (64, 16, 64, 64)
    print(f"peak RSS grew by {grown_mb:.1f} MB")
    assert grown_mb < 100, f"building a 200 MB memory-mapped dataset raised the peak RSS by {grown_mb:.0f} MB"
