"""posae: position-aware sparse autoencoders. Command line: `python -m posae --help`."""

from __future__ import annotations

import argparse
import sys


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v for item in values or [] for v in item.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posae", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = sub.add_parser("reproduce", help="run every notebook in order and rebuild figures/<config>/",
                         description="Run the pipeline with papermill; finished, unchanged stages are skipped.")
    rep.add_argument("--config", default="default", help="name under params/ or a YAML path (default: default)")
    rep.add_argument("--force", action="append", metavar="STAGE", help="rerun STAGE even if up to date (repeatable, or comma-separated; 'train' = all training stages)")
    rep.add_argument("--only", action="append", metavar="STAGE", help="run only these stages")
    rep.add_argument("--variants", help="comma-separated variants to train (default: all registered)")
    rep.add_argument("--jobs", type=int, help="training notebooks run side by side (default: 2 on 2+ cores)")

    cap = sub.add_parser("capture", help="capture activations for a config (what notebook 01 does)")
    cap.add_argument("--config", default="default")

    args = parser.parse_args(argv)
    from posae.config import ConfigError

    try:
        if args.command == "reproduce":
            from posae.reproduce import StageFailed, UnknownStage, reproduce

            try:
                reproduce(args.config, force=_split(args.force), only=_split(args.only),
                          variants=list(_split([args.variants])) if args.variants else None, jobs=args.jobs)
            except StageFailed as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except UnknownStage as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif args.command == "capture":
            from posae.capture import capture
            from posae.config import load_config

            capture(load_config(args.config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
