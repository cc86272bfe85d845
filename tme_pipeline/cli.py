"""The ``tme`` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from .lock import OutputInUse

__all__ = ["main"]

log = logging.getLogger("tme_pipeline")


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synth_cohort

    manifest = synth_cohort(
        args.out, n_patients=args.patients, seed=args.seed, size_mm=tuple(args.size_mm), pixel_um=args.pixel_um,
        style=args.style, post_size_mm=tuple(args.post_size_mm) if args.post_size_mm else None,
        partial_responders=args.partial_responders,
    )
    print(f"wrote {manifest}")
    print(f"ground truth in {Path(args.out) / 'truth'}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .config import load_config
    from .io.slides import open_slide
    from .panel import normalise_name

    config = load_config(args.config)
    slide = open_slide(args.slide, pixel_um=args.pixel_um, channel_names=config.channel_names)
    aliases = {normalise_name(a): m for m, spec in config.panel.items() for a in (m, *spec.aliases)}
    aliases.update({normalise_name(k): v for k, v in config.channel_map.items()})
    height_mm, width_mm = slide.size_mm
    print(f"slide:     {slide.path}")
    print(f"format:    {slide.format}")
    print(f"pixel:     {slide.pixel_um:.4g} µm at level 0")
    print(f"size:      {width_mm:.3f} × {height_mm:.3f} mm (width × height)")
    print(f"dtype:     {slide.levels[0].dtype}")
    print("levels:")
    for i, level in enumerate(slide.levels):
        print(f"  {i}: {level.shape[2]} × {level.shape[1]} px, {slide.level_pixel_um(i):.4g} µm/px")
    print("channels:")
    for i, name in enumerate(slide.channel_names):
        marker = aliases.get(normalise_name(name))
        print(f"  {i}: {name:<16} -> {marker if marker else '(not in panel)'}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .config import load_config

    config = _with_overrides(load_config(args.config), method=args.method, model=args.model, device=args.device)
    config = _with_progress(config, args)
    _allocator_for(config)
    from .segment_command import segment_file

    n = segment_file(args.image, args.out, config=config, channel=args.channel, pixel_um=args.pixel_um)
    print(f"{n} nuclei -> {args.out}")
    return 0


def _allocator_for(config) -> None:
    """Before numpy, torch or Dask start a thread: one glibc heap for StarDist's passes on CPU.

    Freed activations are reused only where threads share the main heap
    (:func:`tme_pipeline.segment._malloc.share_one_heap`), and a thread keeps the heap it
    was first given, so this comes before the heavy imports. `tme run` leaves it (a
    higher peak RSS for the whole pipeline, not measured yet).
    """
    if config.segmentation.method == "stardist":
        from .segment._malloc import share_one_heap

        share_one_heap()


def _with_progress(config, args: argparse.Namespace):
    """The config with ``--quiet``; a quiet run (flag or ``run.progress: quiet``) logs warnings and errors only."""
    if args.quiet:
        config = config.model_copy(update={"run": config.run.model_copy(update={"progress": "quiet"})})
    if config.run.progress == "quiet" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    return config


def _with_overrides(config, *, method: str | None = None, model: str | None = None, device: str | None = None):
    """The config with the segmentation options given on the command line."""
    seg = config.segmentation
    stardist = {k: v for k, v in (("model", model), ("device", device)) if v}
    update = {"method": method} if method else {}
    if stardist:
        update["stardist"] = seg.stardist.model_copy(update=stardist)
    if not update:
        return config
    return config.model_copy(update={"segmentation": seg.model_copy(update=update)})


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = _with_progress(_with_run_options(_with_overrides(load_config(args.config), device=args.device), args),
                            args)
    from .cohort import run_cohort

    result = run_cohort(
        args.manifest,
        args.out,
        config=config,
        config_path=args.config,
        scheduler=args.scheduler,
        pixel_um=args.pixel_um,
        force=args.force,
        force_from=args.from_stage,
    )
    for slide in result.slides:
        detail = f"{slide.n_nuclei} nuclei" if slide.n_nuclei is not None else slide.error
        print(f"{slide.slide_id:<24} {slide.status:<8} {detail}")
    for slide in result.slides:
        if slide.status != "error":
            print(f"{slide.slide_id}: reused {', '.join(slide.reused) or 'nothing'}; "
                  f"ran {', '.join(slide.ran) or 'nothing'}")
    print(f"outputs in {result.out}  (provenance: {result.out / 'run.json'})")
    failed_files = _cohort_file_errors(result.out)
    for error in failed_files:
        print(error, file=sys.stderr)
    if result.n_failed:
        print(f"{result.n_failed} slide(s) failed: see run.json", file=sys.stderr)
    return 1 if result.n_failed or failed_files else 0


def _with_run_options(config, args: argparse.Namespace):
    """The config with ``--workers`` and ``--cluster``: ``--workers N`` alone starts a local cluster of N."""
    if args.workers is None and args.cluster is None:
        return config
    if args.scheduler and "://" in args.scheduler:
        raise ValueError(f"--scheduler {args.scheduler} connects to a running cluster: "
                         "--workers and --cluster start one; give either")
    update = {"n_workers": args.workers} if args.workers is not None else {}
    if args.cluster is not None:
        update["cluster"] = str(args.cluster)
    elif not args.scheduler:
        update["scheduler"] = "local-cluster"
    return config.model_copy(update={"run": config.run.model_copy(update=update)})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cohort_file_errors(out: Path) -> list[str]:
    """The cohort-level files (tables, report) that run.json says could not be written."""
    import json

    try:
        record = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return [f"{out}: run.json cannot be read"]
    return [f"{key.replace('_', ' ')} not written: {entry['error']}" for key, entry in record.items()
            if key.startswith("cohort_") and isinstance(entry, dict) and entry.get("error")]


def _cmd_recompute(args: argparse.Namespace) -> int:
    from .recompute import recompute

    result = recompute(args.out, slide_id=args.slide, progress="quiet" if args.quiet else None)
    for slide in result.slides:
        detail = slide.error if slide.status == "error" else f"ran {', '.join(slide.ran) or 'nothing'}"
        corrections = slide.info.get("corrections") if slide.info else None
        if corrections:
            detail += f"; {corrections['count']} correction(s), last {corrections['last_id']}"
        print(f"{slide.slide_id:<24} {slide.status:<8} {detail}")
    for name, path in result.tables.items():
        print(f"{name}: {path}")
    if result.n_failed:
        print(f"{result.n_failed} slide(s) failed: see run.json", file=sys.stderr)
        return 1
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from .analysis import analyze

    folder = analyze(args.out, group=args.group, metrics=args.metrics, alpha=args.alpha)
    summary = json.loads((folder / "analysis.json").read_text())
    n = summary["patients"]
    print(f"{n['complete']} of {n['n']} patients with both timepoints; {summary['parameters']['n_metrics']} metrics")
    for row in summary["significant"]:
        print(f"  {row['metric']:<36} BH p = {row['p_adjusted']:.3g}  HL {row['hl_estimate']:.4g} {row['unit']}")
    if summary["cold_to_hot"] is not None:
        print(f"cold -> hot: {summary['cold_to_hot']} patient(s)")
    print(f"wrote {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tme", description="Multiplex IF slides to tumour-microenvironment metrics.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic pre/post cohort with ground truth")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=int, default=2, help="number of patients (2 slides each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-mm", nargs=2, type=float, default=(2.0, 1.5), metavar=("W", "H"))
    p.add_argument("--post-size-mm", nargs=2, type=float, default=None, metavar=("W", "H"),
                   help="size of the post-treatment resections (default: --size-mm)")
    p.add_argument("--pixel-um", type=float, default=0.5, help="pixel size (µm)")
    p.add_argument("--style", choices=("default", "external_lab"), default="default",
                   help="slide look: default (as trained) or external_lab (another lab's, for validation)")
    p.add_argument("--partial-responders", action="store_true",
                   help="three response classes (responder, partial_responder, non_responder) instead of two")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("info", help="describe a slide: format, levels, channels -> markers, µm/px")
    p.add_argument("slide", type=Path)
    p.add_argument("--pixel-um", type=float, default=None, help="pixel size (µm) if the file has none")
    p.add_argument("--config", type=Path, default=None)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("segment", help="segment the nuclei of one image into a label TIFF")
    p.add_argument("image", type=Path, help="a slide (OME-TIFF, QPTIFF, OME-Zarr, TIFF) or a 2-D PNG")
    p.add_argument("--out", required=True, type=Path, help="label TIFF to write")
    p.add_argument("--channel", default="DAPI", help="nuclear channel name or panel marker")
    p.add_argument("--pixel-um", type=float, default=None, help="pixel size (µm) if the file has none")
    p.add_argument("--model", default=None, help="StarDist model folder or shipped model name")
    p.add_argument("--method", choices=("stardist", "classic"), default=None)
    p.add_argument("--device", default=None, help="StarDist device: auto | cpu | cuda | cuda:N")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars, log lines or summary: warnings and errors only (run.progress: quiet)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("run", help="run the pipeline on every slide of a manifest")
    p.add_argument("manifest", type=Path, help="CSV: patient_id,timepoint,slide[,pixel_um,...]")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None, help="YAML merged over configs/default.yaml")
    p.add_argument("--scheduler", default=None, help="threads | processes | local-cluster | tcp://host:port")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="start a local Dask cluster of N worker processes (run.threads_per_worker threads each); "
                        "with --cluster: N SLURM jobs")
    p.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                   help="start workers on SLURM from a dask-jobqueue cluster file (configs/cluster-slurm.yaml)")
    p.add_argument("--pixel-um", type=float, default=None, help="pixel size (µm) for slides without one")
    p.add_argument("--device", default=None, help="StarDist device: auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="recompute every stage, even those up to date")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help="recompute from this stage on (segment, cells, measure, phenotype, qc)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars, log lines or summary: warnings and errors only (run.progress: quiet)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("analyze", help="paired pre/post tests of a results folder's patients.h5ad -> OUT/analysis")
    p.add_argument("out", type=Path, help="a results folder of tme run")
    p.add_argument("--group", default=None, metavar="COLUMN", help="also per level of this manifest column")
    p.add_argument("--metrics", nargs="+", default=None, metavar="M", help="only these metrics (default: all)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level; significance level")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("recompute", help="after review corrections, re-run what they made stale (config of run.json)")
    p.add_argument("out", type=Path, help="a results folder of tme run")
    p.add_argument("--slide", default=None, metavar="ID", help="only this slide")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines or summary: warnings and errors only")
    p.set_defaults(func=_cmd_recompute)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also where logging was set up before main (an embedding program)
    try:
        with contextlib.ExitStack() as stack:
            if quiet:  # the summary on standard output goes too; errors still reach standard error
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return args.func(args)
    except (OSError, ValueError, OutputInUse) as error:  # OSError: a full disk, an unwritable folder
        print(f"tme {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
