"""Decode + resize throughput of full-size JPEG photos to a training size, per CPU core.

What a training worker's data path pays per image before augmentation: encoded JPEG bytes (in
memory) -> uint8 (3, S, S) (shorter side resized to S, centre crop). One process, one thread
(``torch.set_num_threads(1)``; Pillow decodes on the calling thread), so images/s is *per core*.

Decoders compared, on the same photos:

* ``pillow_full``: ``Image.open`` + ``convert("RGB")`` + bilinear resize + crop (full-size decode);
* ``pillow_draft``: the same after ``Image.draft`` (libjpeg decodes at 1/2, 1/4 or 1/8 scale);
* ``streamssl_ray_data``: :func:`streamssl.data.images.decode_to_array`, what Ray Data's decode
  tasks run per image (draft + EXIF orientation + resize + crop);
* ``torchvision_decode_jpeg``: :func:`streamssl.data.worker_decode.decode_encoded` on the CPU
  (``torchvision.io.decode_jpeg`` + antialiased resize + crop), what ``data.decode: worker``
  runs on a worker without a GPU; batches of 32; with a CUDA device also on the GPU (nvJPEG,
  batches of 64, images per wall-clock second);
* the last two again on the photos as ``streamssl ingest --max-side M`` stores them
  (:func:`streamssl.data.images.shrink_encoded`);
* ``ray_data_pipeline`` (``--pipeline``): the photos ingested into a temporary dataset and read
  with :func:`streamssl.data.segments.read_rows` in a Ray cluster of ``num_cpus=1``, i.e. one
  CPU's worth of Ray Data tasks (Parquet read + decode + object store), drained on the driver.

Photos: JPEGs that installed packages ship (never downloaded by this script): by default the
Debian package ``mate-backgrounds`` (``/usr/share/backgrounds/mate/nature/*.jpg``, 1280x1024 to
2560x1920 photos) plus the photos that matplotlib and scikit-learn ship.

    python benchmarks/bench_decode.py --size 224 --out benchmarks/results/decode_224.json
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_PHOTOS = ["/usr/share/backgrounds/mate/nature/*.jpg"]


def packaged_photos() -> list[str]:
    """Photo JPEGs shipped by installed Python packages (matplotlib, scikit-learn)."""
    found = []
    for mod, rel in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                     ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg")):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        path = Path(pkg.__file__).parent / rel
        if path.exists():
            found.append(str(path))
    return found


def pillow_decode(data: bytes, size: int, draft: bool) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if draft:
        im.draft("RGB", (size, size))
    im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def measure(cases: dict[str, tuple[Callable[[list[bytes]], object], list[bytes], int]], rounds: int) -> dict[str, dict]:
    """Per case: images per CPU-second of this process, and per wall-clock second.

    The cases run interleaved, one pass over their photos per round, so a change in the load of
    a shared machine hits all of them alike. The CPU time (``time.process_time``) of a
    single-threaded pass counts only the time the process was running, which makes it the
    per-core cost even when other jobs compete for the cores; the wall-clock rate is reported
    beside it (best and median round).
    """
    for fn, datas, batch in cases.values():
        fn(datas[:batch])  # warm-up (imports, allocator)
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    wall: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (fn, datas, batch) in cases.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(0, len(datas), batch):
                fn(datas[i:i + batch])
            cpu[name].append((time.process_time() - c0) / len(datas))
            wall[name].append((time.perf_counter() - w0) / len(datas))
    out = {}
    for name, (_, datas, _) in cases.items():
        out[name] = {"images_per_cpu_s": round(len(cpu[name]) / sum(cpu[name]), 1),
                     "images_per_wall_s_best": round(1 / min(wall[name]), 1),
                     "images_per_wall_s_median": round(1 / statistics.median(wall[name]), 1),
                     "ms_cpu_per_image": round(1000 * sum(cpu[name]) / len(cpu[name]), 2),
                     "images": len(datas) * rounds,
                     "stored_kb_mean": round(sum(map(len, datas)) / len(datas) / 1024, 1)}
    return out


def measure_cuda(datas: list[bytes], size: int, max_sides: list[int], rounds: int, batch: int = 64) -> dict[str, dict]:
    """``data.decode: worker`` on a GPU: nvJPEG batch decode + resize, images per wall-clock second
    (CUDA synchronised after every batch; the host CPU time is reported beside it)."""
    import torch

    from streamssl.data.images import shrink_encoded
    from streamssl.data.worker_decode import decode_encoded

    out = {}
    for m in [None, *max_sides]:
        stored = datas if m is None else [(shrink_encoded(d, m) or (d, None))[0] for d in datas]
        many = (stored * (batch // len(stored) + 1))[:batch]
        decode_encoded(many, size, 3, "cuda")  # warm-up: CUDA context, nvJPEG handles
        torch.cuda.synchronize()
        walls, cpus = [], []
        for _ in range(rounds):
            w0, c0 = time.perf_counter(), time.process_time()
            decode_encoded(many, size, 3, "cuda")
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - w0) / batch)
            cpus.append((time.process_time() - c0) / batch)
        key = "torchvision_decode_jpeg_cuda" + ("" if m is None else f"@max_side_{m}")
        out[key] = {"images_per_wall_s_best": round(1 / min(walls), 1),
                    "images_per_wall_s_median": round(1 / statistics.median(walls), 1),
                    "host_cpu_ms_per_image": round(1000 * statistics.median(cpus), 3),
                    "images": batch * rounds, "device": torch.cuda.get_device_name()}
    return out


def pipeline_rate(photos: list[str], size: int, repeat: int, max_sides: list[int | None]) -> dict[str, dict]:
    """Ray Data read_rows over ingested copies of the photos (as received, and per ``--max-side``),
    with a 1-CPU Ray cluster."""
    import pyarrow as pa
    import ray

    from streamssl.data.ingest import ingest
    from streamssl.data.segments import read_rows
    from streamssl.data.sources import Record, Source

    class Photos(Source):
        name = "photos"

        def __iter__(self):
            for r in range(repeat):
                for i, p in enumerate(photos):
                    yield Record(image_id=f"{r}-{i}", path=p, split="train", origin=p, source="photos")

        def describe(self) -> dict:
            return {"source": "photos", "src": None}

    results = {}
    ids = pa.table({"image_id": [f"{r}-{i}" for r in range(repeat) for i in range(len(photos))]})
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for m in max_sides:
            outs[m] = os.path.join(tmp, f"ds-{m}")
            ingest(Photos(), outs[m], max_side=m)
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            for m, out in outs.items():
                rates = []
                for _ in range(3):
                    ds = read_rows(out, ids, image_size=size, channels=3)
                    t0 = time.perf_counter()
                    n = sum(len(b["image"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
                    rates.append(n / (time.perf_counter() - t0))
                key = "ray_data_pipeline" + ("" if m is None else f"@max_side_{m}")
                results[key] = {"images_per_s": round(statistics.median(rates), 1), "images": ids.num_rows,
                                "runs": 3, "note": "median of 3 drains with num_cpus=1; includes Ray Data task "
                                                   "start-up, Parquet read, object store"}
        finally:
            ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="*", default=DEFAULT_PHOTOS, help="glob patterns of JPEG photos")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--max-side", type=int, nargs="*", default=[256], help="ingest --max-side values to measure")
    ap.add_argument("--rounds", type=int, default=8, help="passes over the photos per decoder, interleaved")
    ap.add_argument("--pipeline", action="store_true", help="also measure the Ray Data pipeline (1 CPU)")
    ap.add_argument("--pipeline-repeat", type=int, default=40, help="copies of each photo in its dataset")
    ap.add_argument("--target", type=float, nargs="*", default=[1000.0, 3000.0], help="images/s per GPU worker")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import PIL
    import torch
    import torchvision

    from streamssl.data.images import decode_to_array, shrink_encoded
    from streamssl.data.worker_decode import decode_encoded

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    paths = sorted({p for pat in args.photos for p in glob.glob(pat)}) + packaged_photos()
    if not paths:
        raise SystemExit("no photos found: install the Debian package mate-backgrounds or pass --photos")
    from PIL import Image

    datas = [Path(p).read_bytes() for p in paths]
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]
    size = args.size
    one_by_one = {
        "pillow_full": lambda b: [pillow_decode(d, size, False) for d in b],
        "pillow_draft": lambda b: [pillow_decode(d, size, True) for d in b],
        "streamssl_ray_data": lambda b: [decode_to_array(d, size, 3) for d in b],
    }
    cases: dict[str, tuple[Callable[[list[bytes]], object], list[bytes], int]] = {
        name: (fn, datas, 1) for name, fn in one_by_one.items()}
    worker = (lambda b: decode_encoded(b, size, 3, "cpu"))  # noqa: E731
    cases["torchvision_decode_jpeg"] = (worker, datas, 32)
    for m in args.max_side:
        small = [(shrink_encoded(d, m) or (d, None))[0] for d in datas]
        cases[f"streamssl_ray_data@max_side_{m}"] = (one_by_one["streamssl_ray_data"], small, 1)
        cases[f"torchvision_decode_jpeg@max_side_{m}"] = (worker, small, 32)
    results = measure(cases, args.rounds)
    if torch.cuda.is_available():
        results.update(measure_cuda(datas, size, args.max_side, args.rounds))
    for name, r in results.items():
        per_cpu = f"{r['images_per_cpu_s']:8.1f} img per CPU-s" if "images_per_cpu_s" in r else f"{'':21s}"
        print(f"{name:40s} {per_cpu}  (wall best {r['images_per_wall_s_best']:.1f} img/s)", flush=True)
    if args.pipeline:
        for key, r in pipeline_rate(paths, size, args.pipeline_repeat, [None, *args.max_side]).items():
            results[key] = r
            print(f"{key:40s} {r['images_per_s']:8.1f} img/s (num_cpus=1)", flush=True)
    cores = {name: {str(int(t)): round(t / r["images_per_cpu_s"], 1) for t in args.target}
             for name, r in results.items() if "images_per_cpu_s" in r}
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_name(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__},
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "size": size,
        "photos": [{"path": p, "width": w, "height": h, "kb": round(len(d) / 1024, 1)}
                   for p, (w, h), d in zip(paths, sizes, datas)],
        "threads": 1,
        "results": results,
        "cores_per_worker": cores,
    }
    print(json.dumps(cores, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
