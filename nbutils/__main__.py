"""Command line: ``python -m nbutils run params/quick``.

    run PRESET        expand the preset into stages and run what is not in outputs/ yet
      --outputs DIR   where artifacts, executed notebooks and report.html go (default: outputs)
      --only KIND     only the stages of one kind (surrogate, poison, search, retrain, report)
                      and what they need
      --dry-run       list the stages and whether each exists, and the run's cost: each kind's
                      count and estimated CPU hours (measured or modelled), the wall time on
                      the workers; nothing runs
      --workers N     stages run at once on a local Dask cluster (default: one per core;
                      1: one after another in this process)
      --scheduler ADDR  run the stages on an existing Dask cluster (tcp://host:8786)
      --inline        run the steps instead of their notebooks (no executed notebooks are
                      kept; faster, for debugging)
      --rerun KIND    run the stages of a kind again although they exist, and the stages that
                      read them (repeatable)
      --fresh-kernels start a kernel for every notebook instead of one warm kernel per worker

    code-digests [--write]   each stage kind's code version and digest (nbutils.pipeline.code_versions)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile


from .core.datasets import DatasetNotFound
from .core.malloc import MALLOC_ENV
from .pipeline.code_versions import PACKAGE_DIR, current_digests
from .pipeline.params import ParamsError
from .pipeline.runner import run as run_preset


def install_kernel() -> None:
    """Register this interpreter as the ``nbutils`` kernel in ``sys.prefix`` (the venv), where
    papermill and JupyterLab started from the venv find it. The kernel logs at ERROR level so
    headless runs are not cluttered by its start-up warnings, and starts with the malloc
    settings of :mod:`nbutils.core.malloc`."""
    # here, not above: ipykernel and Jupyter's client take ~0.3 s to import, which only this
    # command (run once by `make setup`) needs
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        path = write_kernel_spec(tmp + "/nbutils", overrides={"display_name": "Python (nbutils)", "env": MALLOC_ENV},
                                 extra_arguments=["--IPKernelApp.log_level=ERROR"])
        where = KernelSpecManager().install_kernel_spec(path, "nbutils", prefix=sys.prefix)
    print(f"kernel 'nbutils' installed in {where}")


DIGESTS_FILE = "tests/code_digests.json"


def code_digests(write: bool) -> int:
    """Print each stage kind's code version and digest; with ``write``, record them for the test
    that catches a code change without a version bump (:mod:`nbutils.pipeline.code_versions`)."""
    text = json.dumps(current_digests(), indent=2, sort_keys=True) + "\n"
    if write:
        path = PACKAGE_DIR.parent / DIGESTS_FILE
        path.write_text(text)
        print(f"recorded in {path}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbutils", description="Audit NAS against data poisoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a preset's stages and render the report")
    run.add_argument("preset", help="a preset folder, e.g. params/quick")
    run.add_argument("--outputs", default="outputs", help="artifact folder (default: outputs)")
    run.add_argument("--only", default=None, help="only stages of this kind and what they need")
    run.add_argument("--dry-run", action="store_true",
                     help="list the stages and the run's estimated cost without running anything")
    run.add_argument("--workers", type=int, default=None, help="stages at once on a local Dask cluster (default: cores)")
    run.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler to run on")
    run.add_argument("--inline", action="store_true", help="run the steps without their notebooks")
    run.add_argument("--rerun", action="append", default=[], metavar="KIND",
                     help="run the stages of this kind again, and every stage that reads them (repeatable)")
    run.add_argument("--fresh-kernels", action="store_true",
                     help="a fresh kernel for every notebook instead of one warm kernel per worker")
    run.add_argument("--timeout", action="append", default=[], metavar="[KIND=]SECONDS",
                     help="fail a notebook cell that runs longer (default: ten times its estimate, at least "
                          "15 min; 0: no limit); KIND=SECONDS for one kind of stage (repeatable)")
    sub.add_parser("install-kernel", help="register the 'nbutils' Jupyter kernel inside this environment")
    digests = sub.add_parser("code-digests", help="print (or --write) each stage kind's code version and digest")
    digests.add_argument("--write", action="store_true", help=f"record them in {DIGESTS_FILE}")
    args = parser.parse_args(argv)
    if args.command == "install-kernel":
        install_kernel()
        return 0
    if args.command == "code-digests":
        return code_digests(args.write)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcomes = run_preset(args.preset, args.outputs, only=args.only, dry_run=args.dry_run, inline=args.inline,
                              workers=args.workers, scheduler=args.scheduler, rerun=args.rerun,
                              fresh_kernels=args.fresh_kernels, timeouts=args.timeout)
    except (ParamsError, DatasetNotFound, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(o.status in ("failed", "skipped") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
