"""Reading and validating the images of an ingest, fanned out over decode worker processes.

Shared by the first ingest (:mod:`streamssl.data.ingest`) and appends (:mod:`streamssl.data.append`):
records in, ``(record, result)`` pairs out in source order, where a result is what the shard
writer (:mod:`streamssl.data.shard_writer`) stores or reports as a skipped file.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from multiprocessing import get_context
from typing import Any

import numpy as np

from streamssl.data.derived_domains import DerivedDomains, apply_transform, decode_pixels
from streamssl.data.images import BadImage, encode_png, pixels_sha256, probe_image, shrink_encoded
from streamssl.data.sources import IngestWarning, Record

# Records per task sent to a decode worker: large enough that pickling/IPC overhead is small
# next to decoding, small enough that a few chunks in flight stay a few MB.
_CHUNK = 256
# Decode the first records in-process and start worker processes only past this many: for a
# small ingest (tests, a few thousand images) the pool's start-up and IPC would not pay off.
_POOL_AFTER = 4096


def _payload(rec: Record, derived: DerivedDomains | None = None) -> tuple[str, Any, str | None, str]:
    """The part of a record a decode worker needs (metadata stays in the parent): what to read,
    and the derived-domain transform to apply (None: store as received)."""
    transform = None
    if derived is not None and rec.domain is not None:
        t = derived.transform_of(rec.domain)
        transform = None if t == "original" else t
    if rec.error is not None:
        return ("error", rec.error, None, rec.image_id)
    if rec.pixels is not None:
        return ("pixels", rec.pixels, transform, rec.image_id)
    if rec.data is not None:
        return ("bytes", rec.data, transform, rec.image_id)
    if rec.path is not None:
        return ("path", rec.path, transform, rec.image_id)
    return ("error", "record has no image", None, rec.image_id)


def _prepare(payload: tuple[str, Any, str | None, str], max_pixels: int, max_side: int | None = None) -> tuple:
    """Read/encode and validate one image, shrink it to ``max_side`` (:func:`shrink_encoded`),
    then apply its derived-domain transform if any.

    Returns ``("ok", data, width, height, format, sha256_hex, content_hash_hex, original_width,
    original_height)`` or ``("bad", kind, reason)``; the content hash is that of the image as
    received (before shrinking). Runs in worker processes: only plain values cross back.
    """
    kind, value, transform, image_id = payload
    if transform is None or kind == "error":
        return _validate(kind, value, max_pixels, max_side)
    encoded: bytes | None = None  # raw pixels need no validation beyond what encode_png checks below
    if kind != "pixels":
        res = _validate(kind, value, max_pixels, max_side)
        if res[0] != "ok":
            return res
        encoded = res[1]
    try:
        pixels = np.asarray(value) if encoded is None else decode_pixels(encoded)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        out = apply_transform(transform, pixels, image_id)
        data = encode_png(out)
    except Exception as e:  # noqa: BLE001 - reported like any corrupt input, never fatal
        return ("bad", "corrupt", f"{transform} transform failed: {e}")
    sha = hashlib.sha256(data).hexdigest()
    h, w = (int(out.shape[0]), int(out.shape[1]))
    orig = (res[7], res[8]) if encoded is not None else (w, h)
    return ("ok", data, w, h, "PNG", sha, pixels_sha256(out), *orig)


def _validate(kind: str, value: Any, max_pixels: int, max_side: int | None = None) -> tuple:
    if kind == "error":
        return ("bad", "skipped", value)
    if kind == "pixels":
        arr = np.asarray(value)
        try:
            data = encode_png(arr)
        except ValueError as e:
            return ("bad", "corrupt", str(e))
        w, h = int(arr.shape[1]), int(arr.shape[0])
        return ("ok", data, w, h, "PNG", hashlib.sha256(data).hexdigest(), pixels_sha256(arr), w, h)
    if kind == "path":
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError as e:
            return ("bad", "unreadable", f"cannot read file: {e.strerror or e}")
    else:
        data = value
    try:
        info = probe_image(data, max_pixels)
    except BadImage as e:
        return ("bad", e.kind, e.reason)
    content = hashlib.sha256(data).hexdigest()
    orig_w, orig_h = info.width, info.height
    if max_side is not None:
        try:
            shrunk = shrink_encoded(data, max_side, max_pixels)
        except Exception as e:  # noqa: BLE001 - reported like any corrupt input, never fatal
            return ("bad", "corrupt", f"shrinking to --max-side {max_side} failed: {e}")
        if shrunk is not None:
            data, info = shrunk
    sha = hashlib.sha256(data).hexdigest()
    return ("ok", data, info.width, info.height, info.format, sha, content, orig_w, orig_h)


def _prepare_chunk(payloads: list[tuple[str, Any, str | None, str]], max_pixels: int,
                   max_side: int | None = None) -> list[tuple]:
    return [_prepare(p, max_pixels, max_side) for p in payloads]


def _pool_context() -> Any:
    """Process start method for decode workers.

    ``fork`` on Linux: workers start in milliseconds with everything imported, and, unlike
    ``spawn``/``forkserver``, they do not re-run the caller's ``__main__`` (an ``ingest()`` call
    in a script without an ``if __name__ == "__main__"`` guard would otherwise run again in
    every worker). The workers only run Pillow/numpy/hashlib code, never pyarrow, so locks
    held by the parent's other threads at fork time are not touched. Elsewhere (macOS, where
    fork is unsafe) ``spawn``.
    """
    import sys

    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def prepared_records(
    records: Iterable[Record], max_pixels: int, workers: int, derived: DerivedDomains | None = None,
    max_side: int | None = None,
) -> Iterator[tuple[Record, tuple]]:
    """(record, result) pairs in source order; decoding fans out to ``workers`` processes.

    Futures are consumed strictly in submission order, so the output order (and the digest)
    is identical to a serial run; at most ``2 * workers`` chunks are in flight, so memory does
    not depend on how far the source is ahead of the writer. If the worker pool breaks (a
    worker killed, or unable to start) the remaining chunks are decoded in this process.
    """
    it = iter(records)
    executor: ProcessPoolExecutor | None = None
    pool_failed = False
    pending: deque[tuple[list[Record], list[tuple[str, Any, str | None, str]], Future | None]] = deque()

    def pool_broke(e: BaseException) -> None:
        nonlocal pool_failed
        pool_failed = True
        warnings.warn(f"ingest decode workers stopped ({e}); continuing in this process", IngestWarning, stacklevel=5)
        executor.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]

    def submit(payloads: list[tuple[str, Any, str | None, str]]) -> Future | None:
        if executor is None or pool_failed:
            return None
        try:
            return executor.submit(_prepare_chunk, payloads, max_pixels, max_side)
        except BrokenProcessPool as e:  # noticed by submit before any result
            pool_broke(e)
            return None

    def results(payloads: list[tuple[str, Any, str | None, str]], fut: Future | None) -> list[tuple]:
        if fut is not None:
            try:
                return fut.result()  # finished before a breakdown: still good
            except BrokenProcessPool as e:
                if not pool_failed:
                    pool_broke(e)
            except CancelledError:  # cancelled by the shutdown after a breakdown
                pass
        return _prepare_chunk(payloads, max_pixels, max_side)

    done = 0
    try:
        while True:
            chunk = list(islice(it, _CHUNK))
            if not chunk:
                break
            payloads = [_payload(r, derived) for r in chunk]
            if executor is None and workers > 1 and done >= _POOL_AFTER:
                executor = ProcessPoolExecutor(workers, mp_context=_pool_context())
            # A chunk without a future is decoded in-process when its turn comes (after older
            # chunks), which keeps the order when the pool is off or broken.
            pending.append((chunk, payloads, submit(payloads)))
            while pending and (len(pending) >= 2 * workers or pending[-1][2] is None):
                c, p, fut = pending.popleft()
                yield from zip(c, results(p, fut))
            done += len(chunk)
        while pending:
            c, p, fut = pending.popleft()
            yield from zip(c, results(p, fut))
    finally:
        if executor is not None:
            executor.shutdown(wait=not pool_failed, cancel_futures=True)
