"""The ``streamssl`` command line.

Every verb is a thin layer over a library function, so what the CLI does is also scriptable.
Configuration errors are reported as one readable message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from streamssl.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist_class_incremental.yaml"
# Verbs that run Ray on this machine: their console is streamssl's own (see streamssl.console).
CONSOLE_VERBS = ("train", "resume", "extend", "demo", "tune", "study", "embed")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- verbs


def cmd_ingest(a: argparse.Namespace) -> int:
    from streamssl.data.ingest import ingest

    summary = ingest(a.source, a.out, src=a.src, shard_rows=a.shard_rows, progress=not a.quiet,
                     derive_domains=a.derive_domains, append=a.append, max_side=a.max_side)
    _print_json(summary)
    return 0


def cmd_stream(a: argparse.Namespace) -> int:
    from streamssl.data.protocols import make_plan

    meta = make_plan(a.dataset, a.protocol, a.segments, a.seed, grouping_file=a.grouping, window=a.window,
                     out_dir=a.out, val_fraction=a.val_fraction)
    print(f"stream plan: {meta.get('protocol')} with {meta.get('num_segments')} segments "
          f"(seed {meta.get('seed')}, digest {str(meta.get('digest'))[:16]})")
    if meta.get("grouping"):
        print(f"class grouping ({meta['grouping'].get('method', '')}):")
        for i, group in enumerate(meta["grouping"].get("groups", [])):
            print(f"  group {i}: {', '.join(map(str, group))}")
    for seg in meta.get("segments", []):
        what = seg.get("classes") or seg.get("domains") or seg.get("time_range") or ""
        print(f"  segment {seg['segment']}: {seg['count']} images  {what}")
    print(f"written to {meta.get('out_dir')}")
    return 0


def _config(a: argparse.Namespace) -> Any:
    return load_config(a.config, a.overrides)


def cmd_train(a: argparse.Namespace) -> int:
    from streamssl.assemble import default_callbacks
    from streamssl.train.demo import results_table
    from streamssl.train.driver import StreamRunner
    from streamssl.train.progress import ProgressPrinter

    cfg = _config(a)
    with ProgressPrinter() as progress:
        runner = StreamRunner(cfg, a.run_dir, callbacks=[progress, *default_callbacks(cfg)])
        results = runner.run()
    print()
    print(results_table(results, None))
    print()
    print(f"run directory: {runner.run_dir}")
    return 0


def cmd_resume(a: argparse.Namespace) -> int:
    from streamssl.assemble import default_callbacks
    from streamssl.run.config_file import load_run_config
    from streamssl.run.layout import canonical_run_dir
    from streamssl.train.demo import results_table
    from streamssl.train.driver import resume
    from streamssl.train.progress import ProgressPrinter

    cfg = load_run_config(a.run_dir)
    with ProgressPrinter() as progress:
        results = resume(a.run_dir, callbacks=[progress, *default_callbacks(cfg)])
    print()
    print(results_table(results, None))
    print()
    print(f"run directory: {canonical_run_dir(a.run_dir)}")
    return 0


EXIT_NOTHING_TO_EXTEND = 3


def cmd_extend(a: argparse.Namespace) -> int:
    from streamssl.assemble import default_callbacks
    from streamssl.run.config_file import load_run_config
    from streamssl.run.layout import canonical_run_dir
    from streamssl.train.demo import results_table
    from streamssl.train.extend import NothingToExtend, extend
    from streamssl.train.progress import ProgressPrinter

    # `segments=K` among the overrides is --segments K (how `streamssl submit --command extend` passes it).
    overrides = [o for o in a.overrides if not o.startswith("segments=")]
    segments = int(next((o.split("=", 1)[1] for o in a.overrides if o.startswith("segments=")), a.segments))
    cfg = load_run_config(a.run_dir, overrides)
    try:
        with ProgressPrinter() as progress:
            results = extend(a.run_dir, segments=segments, overrides=overrides,
                             callbacks=[progress, *default_callbacks(cfg)])
    except NothingToExtend as e:
        print(f"streamssl extend: {e}", file=sys.stderr)
        return EXIT_NOTHING_TO_EXTEND
    print()
    print(results_table(results, None))
    print()
    print(f"run directory: {canonical_run_dir(a.run_dir)}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from streamssl.assemble import default_callbacks
    from streamssl.train.demo import run_demo

    return run_demo(a.config or str(DEFAULT_CONFIG), a.overrides, run_dir=a.run_dir, callbacks_for=default_callbacks)


def cmd_eval(a: argparse.Namespace) -> int:
    from streamssl.evaluate.after_segment import evaluate_path

    _print_json(evaluate_path(a.path, data_dir=a.data, overrides=a.overrides))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from streamssl.tracking.report import compare_runs

    print(compare_runs(a.run_dirs, reference=a.reference))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from streamssl.export import export_encoder

    print(export_encoder(a.path, a.out))
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from streamssl.embed import embed

    summary = embed(a.run_dir, a.dataset, a.out, segment=a.segment, split=a.split, batch_size=a.batch_size,
                    actors=a.actors, ray_address=a.address)
    _print_json(asdict(summary))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from streamssl.tune.sweep import run_sweep

    cfg = _config(a)
    best = run_sweep(cfg, resume=a.resume, sweep_dir=a.sweep_dir)
    _print_json(best)
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from streamssl.study import run_study

    summary = run_study(a.config, a.out, resume=a.resume, overrides=a.overrides)
    print((Path(summary["study_dir"]) / "study.md").read_text())
    print(f"study directory: {summary['study_dir']} ({summary['finished']}/{summary['cells']} cells finished)")
    if summary.get("errors"):
        print(f"streamssl study: {len(summary['errors'])} cell(s) failed: {', '.join(summary['errors'])}",
              file=sys.stderr)
        return 1
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    from streamssl.jobs import submit_from_args

    return submit_from_args(a)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamssl", description="Continual self-supervised pre-training of image "
                                "encoders on streaming data, on Ray Train + DeepSpeed, tracked in MLflow.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("ingest", help="turn images into Parquet shards + index")
    s.add_argument("--source", required=True, choices=["fashion-mnist", "idx", "folder", "manifest"])
    s.add_argument("--src", default=None, help="source path (default: the source's standard location)")
    s.add_argument("--out", required=True, help="output dataset directory or pyarrow URI (file://, s3://)")
    s.add_argument("--shard-rows", type=int, default=None,
                   help="images per shard (default 10000; with --append: the dataset's)")
    s.add_argument("--derive-domains", default=None, metavar="SPEC",
                   help="split the images into synthetic domains, one transform each, e.g. "
                        "original,rotate90,invert,blur_noise (for `stream --protocol domain`)")
    s.add_argument("--append", action="store_true",
                   help="add the images to the existing dataset at --out as a new drop (new shards only; "
                        "duplicate image ids are refused; a failed or killed append changes nothing)")
    s.add_argument("--max-side", type=int, default=None, metavar="S",
                   help="store images whose shorter side is larger than S px re-encoded with shorter side S "
                        "(original size kept in the index); e.g. 256 for training at 224 px: decoding then "
                        "costs ~6x less CPU (benchmarks/README.md). Default: store images as received")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("stream", help="cut a dataset's train split into an ordered stream of segments")
    s.add_argument("dataset")
    s.add_argument("--protocol", required=True, choices=["instance", "class_random", "class_distant", "domain", "time"])
    s.add_argument("--segments", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grouping", default=None, help="class_distant: YAML/JSON file of class groups")
    s.add_argument("--window", default=None, help="time: segment length such as 7d or 12h")
    s.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of the train split held back as the validation split (never streamed)")
    s.add_argument("--out", default=None, help="plan directory (default: DATASET/streams/<name>)")
    s.set_defaults(fn=cmd_stream)

    for verb, fn, helptext in (("train", cmd_train, "train an encoder over a stream"),
                               ("tune", cmd_tune, "Ray Tune sweep over continual-learning knobs"),
                               ("demo", cmd_demo, "ingest Fashion-MNIST if needed and run the default stream")):
        s = sub.add_parser(verb, help=helptext)
        s.add_argument("config", nargs="?" if verb == "demo" else None, default=None, help="YAML config")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
        s.add_argument("--run-dir", default=None)
        if verb == "tune":
            s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
            s.add_argument("--sweep-dir", default=None)
        s.set_defaults(fn=fn)

    s = sub.add_parser("study", help="sequential vs joint: the comparison grid as one Ray Tune experiment")
    s.add_argument("config", help="study YAML (see configs/study_fashion_mnist.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base run config")
    s.add_argument("--out", required=True, help="study directory (table, figures, one run dir per cell)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    s.set_defaults(fn=cmd_study)

    s = sub.add_parser("resume", help="continue a killed run from its last completed segment")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_resume)

    s = sub.add_parser("extend", help="train a finished run on data appended since (new segments from its last checkpoint)")
    s.add_argument("run_dir")
    s.add_argument("--segments", type=int, default=1,
                   help="new segments to cut the new images into (default 1; also as segments=K)")
    s.add_argument("overrides", nargs="*", help="config overrides for the new segments (key=value)")
    s.set_defaults(fn=cmd_extend)

    s = sub.add_parser("eval", help="evaluate a run or checkpoint on frozen features")
    s.add_argument("path")
    s.add_argument("--data", default=None, help="dataset directory (default: the run's)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="Markdown table comparing runs")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--reference", default=None, help="run dir used as CKA reference")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("export", help="write a run's encoder to one self-describing file")
    s.add_argument("path")
    s.add_argument("out")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("embed", help="write one embedding per image of a dataset (Parquet) with a run's encoder")
    s.add_argument("run_dir", help="run directory (or a segment checkpoint), local path or URI")
    s.add_argument("dataset", help="ingested dataset directory or URI")
    s.add_argument("--out", required=True, help="output directory of Parquet files (local path or URI); must not exist")
    s.add_argument("--segment", type=int, default=None, help="the segment whose encoder to use (default: the last finished)")
    s.add_argument("--split", default=None, help="only this split of the dataset (default: every image)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--actors", type=int, default=None,
                   help="encoder actors (default: one per GPU of the cluster, else half its CPUs)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("submit", help="run train / tune / demo / resume / eval on a Ray cluster "
                       "through the Ray Jobs API (see jobs/README.md)")
    from streamssl.jobs import add_submit_arguments

    add_submit_arguments(s)
    s.set_defaults(fn=cmd_submit)

    # Before or after the verb: `streamssl -v train ...` and `streamssl train ... -v`.
    verbose_help = ("show Ray's, Ray Train's, Ray Data's and DeepSpeed's output on the console "
                    "(default: only streamssl's own lines and errors; the rest is in the run's logs/)")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    every_help = ("seconds between two in-segment progress lines when the console is a pipe or a file "
                  "(default 30; also STREAMSSL_PROGRESS_EVERY); a terminal shows a live bar")
    p.add_argument("--progress-every", type=float, default=None, metavar="S", help=every_help)
    for verb_parser in sub.choices.values():
        verb_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        verb_parser.add_argument("--progress-every", type=float, default=argparse.SUPPRESS, metavar="S",
                                 help=every_help)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so in
    # `train CONFIG --run-dir D k=v` the k=v would be "unrecognized": take them as overrides.
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.progress_every is not None:  # read by streamssl.train.progress (also in Tune trials)
        if not args.progress_every >= 0:
            parser.error(f"--progress-every {args.progress_every}: must be a number of seconds >= 0")
        os.environ["STREAMSSL_PROGRESS_EVERY"] = str(args.progress_every)
    if args.verb not in CONSOLE_VERBS:
        return _run_verb(args)
    from streamssl import console

    # Ray's, Ray Data's and DeepSpeed's output goes to the run's logs/ unless -v (streamssl.console).
    with console.session(verbose=args.verbose):
        try:
            rc = _run_verb(args)
        except Exception:  # noqa: BLE001 (the traceback first, then where the logs are)
            traceback.print_exc()
            rc = 1
        where = console.logs_summary()
        if where:
            print(where, file=sys.stdout if rc == 0 else sys.stderr, flush=True)
        return rc


def _run_verb(args: argparse.Namespace) -> int:
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"streamssl: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # Ingest/stream/config problems are the user's to fix: one clear line, no traceback.
        print(f"streamssl {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
