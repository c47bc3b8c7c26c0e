"""Look at a finished stream in MLflow's web UI, in a real (headless) browser.

    python docs/mlflow_ui_check.py                          # train a small 3-segment stream first
    python docs/mlflow_ui_check.py --run-dir runs/<run>     # or use a finished run directory
    python docs/mlflow_ui_check.py --run-dir R --out DIR --chromium /usr/bin/chromium

Steps: start ``mlflow server`` on 127.0.0.1 (a free port) over the run directory's SQLite store,
open six pages with headless Chromium (a fresh browser profile each: what a first visit shows),
wait until each shows what it should (DevTools protocol, real time: at most 90 s),
save a screenshot of each (``--out``, default ``docs/mlflow-ui``), and check what the rendered
page says:

1. ``experiment_default_view.png``: the experiment link without a workflow: MLflow 3.17 opens
   its GenAI overview (informational: the "GenAI | Model training" switch is top left);
2. ``experiment.png``: the link streamssl logs (``?workflowType=machine_learning``,
   :func:`streamssl.tracking.mlflow_store.ui_url`) lands on the runs table with the stream run;
3. ``stream_run.png``: the stream run's overview (datasets, tags, child segment runs) and its
   description, which links each probe's accuracy with its random-init level;
4. ``stream_metrics.png``: the stream run's metric charts, the random-init baseline
   (``baseline/random_init_*``) next to the stream's accuracy (``eval/*_acc``);
5. ``accuracy_vs_random_init.png``: the description's "linear" link: MLflow's metric page with
   ``eval/linear_acc`` and ``baseline/random_init_linear_acc`` in one chart;
6. ``accuracy_plot.png``: the ``plots/accuracy_per_segment.png`` artifact, stream accuracy with
   dashed random-init levels.

Chromium is not a dependency of streamssl (Debian: ``apt-get install chromium``). Exit status 0
when every required check passed; ``checks.json`` in ``--out`` lists each check and its outcome.
``docs/mlflow-ui.md`` describes the screenshots committed from one run of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_PNG_BYTES = 300_000
# A small but real stream: Fashion-MNIST, 3 class-incremental segments, evaluation after each.
TRAIN_OVERRIDES = [
    "name=fmnist-ui-check", "stream.segments=3", "stream.max_images_per_segment=2000",
    "optim.steps_per_segment=30", "optim.warmup_steps=3", "replay.size=500",
    "eval.max_train_images=2000", "eval.max_test_images=1000", "eval.linear_epochs=30",
    "eval.fewshot_episodes=20", "eval.diagnostics=false", "tracking.experiment=streamssl-ui-check",
]


@dataclass
class Page:
    name: str  # screenshot file stem
    route: str  # the UI's hash route
    expect: list[str] = field(default_factory=list)  # texts the rendered page must contain
    reject: list[str] = field(default_factory=list)  # texts it must not contain
    required: bool = True  # False: recorded, but not a failure
    width: int = 1400  # window size of the screenshot
    height: int = 900


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_small_stream(run_dir: Path) -> None:
    """``streamssl train`` of the default config, shrunk to a few minutes on 2 CPU cores."""
    bin_dir = Path(sys.executable).parent
    cli = [str(bin_dir / "streamssl")] if (bin_dir / "streamssl").is_file() else [sys.executable, "-m", "streamssl.cli"]
    data = ROOT / "data" / "fashion-mnist"
    if not (data / "dataset.json").is_file():
        subprocess.run([*cli, "ingest", "--source", "fashion-mnist", "--out", str(data)], cwd=ROOT, check=True)
    subprocess.run([*cli, "train", str(ROOT / "configs" / "fashion_mnist_class_incremental.yaml"),
                    "--run-dir", str(run_dir), f"data.dataset_dir={data}", *TRAIN_OVERRIDES], cwd=ROOT, check=True)


def start_server(db: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` over ``db`` (the run's artifacts are file:// URIs it reads directly)."""
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(workdir / "mlflow-server.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([*cmd, "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{(workdir / 'mlflow-server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise TimeoutError("mlflow server did not become healthy in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class Browser:
    """Headless Chromium driven through its DevTools protocol (``aiohttp``, an MLflow dependency):
    load a page, wait in real time until its text shows what is expected, then screenshot it.
    (``--virtual-time-budget`` alone let MLflow's lazily drawn charts be captured half drawn.)"""

    def __init__(self, binary: str, profile: Path, width: int, height: int) -> None:
        self.binary, self.profile, self.width, self.height = binary, profile, width, height
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start its DevTools endpoint")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_server(self.proc)

    def capture(self, url: str, shot: Path, expect: list[str], timeout_s: float = 90.0) -> str:
        """Open ``url``, wait until every text in ``expect`` is on the page (or ``timeout_s``),
        let it settle, save a PNG screenshot; returns the page's visible text."""
        return asyncio.run(self._capture(url, shot, expect, timeout_s))

    async def _capture(self, url: str, shot: Path, expect: list[str], timeout_s: float) -> str:
        import aiohttp  # an MLflow dependency

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                target = next(t for t in await r.json() if t.get("type") == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))

                async def call(method: str, **params: object) -> dict:
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if data.get("id") == i:
                            if "error" in data:
                                raise RuntimeError(f"{method}: {data['error']}")
                            return data.get("result", {})
                    raise RuntimeError("DevTools connection closed")

                async def text() -> str:
                    res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                     returnByValue=True)
                    return str(res.get("result", {}).get("value", ""))

                await call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                           deviceScaleFactor=1, mobile=False)
                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout_s
                seen = ""
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    seen = await text()
                    if seen and all(t in seen for t in expect):
                        break
                await asyncio.sleep(1.0)  # fonts, chart transitions; then charts fit their final boxes
                await call("Runtime.evaluate", expression="window.dispatchEvent(new Event('resize'))")
                await asyncio.sleep(1.5)
                seen = await text()
                png = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(png["data"]))
                return seen


def shrink_png(path: Path, limit: int = MAX_PNG_BYTES) -> None:
    """Re-encode a screenshot with a 256-colour palette when it is over ``limit`` bytes."""
    if path.stat().st_size <= limit:
        return
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _run_tags(url: str, run_id: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as r:
        run = json.loads(r.read())["run"]
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def pages_for(run_dir: Path, url: str) -> list[Page]:
    ids = json.loads((run_dir / "mlflow_run.json").read_text())
    exp, run = ids["experiment_id"], ids["parent_run_id"]
    names: list[str] = []
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        import yaml

        names = [n for n in [(yaml.safe_load(cfg_file.read_text()) or {}).get("name")] if n]
    ml = "?workflowType=machine_learning"  # what streamssl.tracking.mlflow_store.ui_url appends
    run_page = f"#/experiments/{exp}/runs/{run}"
    # The stream run's description links each probe's accuracy + random-init level as one chart.
    links = dict(re.findall(r"\[(\w+)\]\((#/metric/[^)]+)\)", _run_tags(url, run).get("mlflow.note.content", "")))
    pages = [
        Page("experiment_default_view", f"#/experiments/{exp}", expect=["Overview"], required=False),
        Page("experiment", f"#/experiments/{exp}{ml}", expect=["Runs", *names], reject=["Get started with GenAI"]),
        Page("stream_run", f"{run_page}{ml}", height=1000,
             expect=["segment-000", "Datasets", "against the same encoder at random init", *names]),
        Page("stream_metrics", f"{run_page}/model-metrics{ml}", height=1800,
             expect=["baseline", "random_init_linear_acc", "linear_acc", "knn_acc"]),
        # 1600 px: at 1400 the metric page's chart is laid out wider than what MLflow's assistant
        # panel leaves of the window, and its right end is cut off.
        Page("accuracy_vs_random_init", links.get("linear", f"#/metric/?linear-link-missing{ml}"), width=1600,
             expect=["eval/linear_acc", "baseline/random_init_linear_acc"]),
        Page("accuracy_plot", f"{run_page}/artifacts/plots/accuracy_per_segment.png{ml}",
             expect=["accuracy_per_segment.png"]),
    ]
    return pages


def check(run_dir: Path, out: Path, browser: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-check-") as tmp:
        work = Path(tmp)
        proc, url = start_server(run_dir / "mlflow.db", work)
        try:
            for page in pages_for(run_dir, url):
                full = f"{url}/{page.route}"
                shot = out / f"{page.name}.png"
                # A fresh profile per page: each is what a first visit shows.
                with Browser(browser, work / f"profile-{page.name}", page.width, page.height) as b:
                    text = b.capture(full, shot, page.expect)
                ok_shot = shot.is_file() and shot.stat().st_size > 0
                if ok_shot:
                    shrink_png(shot)
                missing = [t for t in page.expect if t not in text]
                present = [t for t in page.reject if t in text]
                results.append({"page": page.name, "url": full, "required": page.required,
                                "screenshot": shot.name if ok_shot else None,
                                "bytes": shot.stat().st_size if ok_shot else 0, "missing": missing,
                                "unexpected": present, "ok": ok_shot and not missing and not present})
        finally:
            stop_server(proc)
    (out / "checks.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", help="a finished run directory with the default MLflow store (mlflow.db)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mlflow-ui"), help="where the screenshots go")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args(argv)
    if args.run_dir:
        run_dir = Path(args.run_dir).resolve()
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="streamssl-ui-run-"))
        train_small_stream(run_dir)
    if not (run_dir / "mlflow.db").is_file():
        print(f"{run_dir}: no mlflow.db (a run tracked to the default store is needed)", file=sys.stderr)
        return 2
    results = check(run_dir, Path(args.out).resolve(), args.chromium)
    for r in results:
        status = "ok  " if r["ok"] else ("FAIL" if r["required"] else "note")
        detail = "" if r["ok"] else f"  missing={r['missing']} unexpected={r['unexpected']}"
        print(f"{status} {r['page']:<24} {r['bytes'] / 1000:6.0f} kB  {r['url']}{detail}")
    print(f"run directory: {run_dir}\nscreenshots: {args.out}")
    return 0 if all(r["ok"] for r in results if r["required"]) else 1


if __name__ == "__main__":
    sys.exit(main())
