"""posae: position-aware sparse autoencoders. Command line: `python -m posae --help`."""

from __future__ import annotations

import argparse
import errno
import sys

# Errors whose message already names what is wrong and the fix: printed as one line `error: ...`,
# never a traceback (anything else still shows its traceback). Exit 2: the input or the state
# found was refused before the work; 1: the work itself failed. Named by module, and matched only
# when that module is loaded (it raised, so it is), so neither --help nor a config error imports torch.
KNOWN_ERRORS = {
    ("posae.config", "ConfigError"): 2,
    ("posae.pipeline.stages", "UnknownStage"): 2,
    ("posae.pipeline.driver", "ExecutorError"): 2,
    ("posae.pipeline.cost", "UnknownGPU"): 2,
    ("posae.paths", "Busy"): 2,
    ("posae.paths", "OutputNotWritable"): 2,
    ("posae.pipeline.export", "ExportError"): 2,
    ("posae.data.store", "StoreError"): 2,
    ("posae.checkpoint", "CheckpointMismatch"): 2,
    ("posae.pipeline.stages", "UpstreamNotReady"): 2,  # before StageFailed, its base: the first match wins
    ("posae.pipeline.stages", "StageFailed"): 1,
    ("posae.train", "TrainingDiverged"): 1,
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def known_error(e: BaseException) -> tuple[str, int] | None:
    """(the one line to print, the exit code) for an error of KNOWN_ERRORS or a full disk; None otherwise."""
    for (module, name), code in KNOWN_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            # An OSError's str() starts with "[Errno n]"; its strerror is the message itself.
            return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)), code
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        from posae.paths import _explain_disk_full, runs_root

        explained = e if "Fix:" in (e.strerror or "") else _explain_disk_full(e, e.filename or runs_root())
        return explained.strerror, 1
    return None


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v for item in values or [] for v in item.split(",") if v)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="override one key of the config, e.g. --set train.l1=0.05 (repeatable; the value is read as "
                        "YAML: 0.05, true, null, [0, 1]); the result is a new config with its own runs/<name>/, "
                        "sharing the config's activation stores when model, corpus and capture are unchanged "
                        "(docs/configs.md)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                   help="override model.device for this command and the notebooks it starts (sets POSAE_DEVICE); "
                        "a device that is not there fails at once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posae", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = sub.add_parser("reproduce", help="run every notebook in order and rebuild figures/<config>/",
                         description="Run the pipeline with papermill; finished, unchanged stages are skipped.")
    rep.add_argument("--config", default="default", help="name under params/ or a YAML path (default: default)")
    rep.add_argument("--force", action="append", metavar="STAGE", help="rerun STAGE even if up to date (repeatable, or comma-separated; 'train' = all training stages)")
    rep.add_argument("--only", action="append", metavar="STAGE", help="run only these stages")
    rep.add_argument("--variants", help="comma-separated variants to train (default: all registered)")
    rep.add_argument("--jobs", type=int, help="training notebooks run side by side (default: one per core)")
    rep.add_argument("--executor", choices=("local", "dask"), default="local",
                     help="where training runs: 'local' notebooks, or 'dask' tasks (one per variant x layer x seed; "
                          "needs the dask extra)")
    rep.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: a running scheduler, e.g. "
                     "tcp://10.0.0.5:8786 (default: start a LocalCluster here)")
    rep.add_argument("--workers", type=int, help="with --executor dask and no --scheduler: LocalCluster workers, "
                     "one thread each (default: one per core)")
    _add_set(rep)
    _add_device(rep)

    cap = sub.add_parser("capture", help="capture activations for a config (what notebook 01 does)")
    cap.add_argument("--config", default="default")
    _add_set(cap)
    _add_device(cap)

    pln = sub.add_parser("plan", help="what a run of a config would do: tokens, store size, memory, time on a GPU",
                         description="Print the stages, the tokens captured, the SAE runs, the activation store's "
                                     "size on disk, peak memory and an estimated time on a named GPU from FLOP "
                                     "counts. Offline: nothing is downloaded.")
    pln.add_argument("--config", default="default", help="name under params/ or a YAML path (default: default)")
    pln.add_argument("--gpu", default="A100", type=str.upper, help="GPU for the time estimate: A100 (default), "
                     "H100, L4 or T4")
    _add_set(pln)
    _add_device(pln)

    exp = sub.add_parser("export-saelens", help="write a trained run as a SAELens checkpoint (needs the saelens extra)",
                         description="Write RUN_DIR's SAE to OUT_DIR in the format of the installed sae-lens 6.x "
                                     "(cfg.json + sae_weights.safetensors), normalisation folded in: it takes raw "
                                     "activations. Position-aware variants refuse, saying why.")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/default/saes/baseline/layer_8/seed_0")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must be absent or empty unless --force)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except Exception as e:
        known = known_error(e)
        if known is None:
            raise
        print(f"error: {known[0]}", file=sys.stderr)
        return known[1]


def _run(args: argparse.Namespace) -> int:
    from posae.config import device_env

    # The notebooks papermill starts inherit the environment, so they see the override too.
    with device_env(getattr(args, "device", None)):
        if args.command == "reproduce":
            from posae.pipeline.driver import reproduce

            # --variants "" is a list naming nothing (refused), not "all": only leaving it out means all.
            reproduce(args.config, force=_split(args.force), only=_split(args.only),
                      variants=list(_split([args.variants])) if args.variants is not None else None,
                      jobs=args.jobs, executor=args.executor, scheduler=args.scheduler, workers=args.workers,
                      overrides=args.overrides)
        elif args.command == "capture":
            from posae.checks import load_config
            from posae.data.capture import capture

            capture(load_config(args.config, overrides=args.overrides))
        elif args.command == "export-saelens":
            from posae.pipeline.export import export_saelens

            out = export_saelens(args.run_dir, args.out_dir, force=args.force)
            print(f"wrote {out}: load it with sae_lens.SAE.load_from_disk({str(out)!r}); it takes raw activations")
        elif args.command == "plan":
            from posae.checks import load_config
            from posae.pipeline.cost import format_plan, make_plan

            config = (load_config(args.config, check_model=False, overrides=args.overrides) if args.overrides
                      else args.config)
            print(format_plan(make_plan(config, gpu=args.gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
