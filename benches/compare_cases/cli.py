"""qcowx beside QEMU's own tools, on the same images, in one run.

    benches/compare [--quick] [--rounds N] [--only CASES] [--dir DIR] [--out DIR]
                    [--install] [--no-build] [--keep]

Builds the binaries (qcowx, qcowx-nbd, qcowx-bench, qcowx-bench-tool), makes
the images, runs every qcowx case and its QEMU counterpart alternately (the order
swaps every round), and writes RESULTS.md (medians, ratios, targets met or missed,
the machine) and SVG plots. See benches/README.md for the cases.

--quick     small images, one round, short runs: a smoke test that everything still
            works (about a minute, plus the build: with the dev profile, which
            `cargo test` has already built). Its numbers mean nothing and a
            missed target never fails it; only something broken does. Writes to
            target/compare-quick/ unless --out says otherwise.
--rounds    rounds per case (default 3).
--only      comma-separated cases: io, reads, snapshots, cow, subcluster, gc, diff, nbd, disk,
            serve, scan, import, send, large
            (default: all).
--dir       where to put the images (default: a new folder under $TMPDIR or /tmp).
            The full run needs about 40 GB there (the send case: a 16 GiB image
            full of data and its 16 GiB copy by qemu-img convert; the disk case:
            4 GB of data; most other files are sparse; the serve case's 1 TiB
            image holds about 220 MB of metadata).
--out       where RESULTS.md and plots/ go (default: benches/, or
            target/compare-quick/ with --quick). Text after the line
            "<!-- analysis -->" in an existing RESULTS.md is kept.
--install   apt-get install the Debian packages that are missing (qemu-utils, fio,
            nbdkit).
--no-build  use the binaries already built.
--profile   cargo profile of the binaries (default: release; dev with --quick, whose
            binaries the test suite has already built).
--keep      leave the images in place at the end (for profiling a case by hand).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import Broken, Ctx, fmt, log, run
from .report import machine, write_report
from .local_io import case_cow, case_io, case_reads, case_subcluster
from .snapshots import case_diff, case_gc, case_snapshots
from .nbd import case_disk, case_nbd
from .serve import case_serve
from .whole_image import case_import, case_large, case_scan, case_send


ALL_CASES = ["io", "reads", "snapshots", "cow", "subcluster", "gc", "diff", "nbd", "disk", "serve",
             "scan", "import", "send", "large"]
PACKAGES = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
            "fio": "fio", "nbdkit": "nbdkit"}


CASES = {"io": case_io, "reads": case_reads, "snapshots": case_snapshots, "cow": case_cow,
         "subcluster": case_subcluster,
         "gc": case_gc, "diff": case_diff, "nbd": case_nbd, "disk": case_disk,
         "serve": case_serve, "scan": case_scan,
         "import": case_import, "send": case_send, "large": case_large}


def check_tools(install):
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    if missing and install:
        log(f"installing {' '.join(missing)}")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        run(sudo + ["apt-get", "update", "-q"])
        run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        missing = sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "fio"):
        if shutil.which(tool) is None:
            raise Broken(f"{tool} not found: install the Debian package {PACKAGES[tool]} "
                         "(or run with --install)")
    if subprocess.run(["fio", "--enghelp=nbd"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        raise Broken("this fio has no nbd engine (Debian's fio has it)")


def build(root, no_build, profile):
    names = ["qcowx", "qcowx-nbd", "qcowx-bench", "qcowx-bench-tool"]
    if not no_build:
        log(f"building the binaries ({profile} profile)")
        run(["cargo", "build", "-q", "--profile", profile, "-p", "qcowx-cli", "-p", "qcowx-nbd",
             "-p", "qcowx-benches", *[f"--bin={n}" for n in names]], cwd=root)
    meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=root))
    target = Path(meta["target_directory"]) / ("debug" if profile == "dev" else profile)
    bins = {n: target / n for n in names}
    for n, p in bins.items():
        if not os.access(p, os.X_OK):
            raise Broken(f"{p} is missing (build it, or drop --no-build)")
    return bins


def main():
    ap = argparse.ArgumentParser(prog="benches/compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(ALL_CASES))
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--out")
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--profile")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")
    root = Path(__file__).resolve().parent.parent.parent  # benches/compare_cases/cli.py
    out_dir = Path(args.out) if args.out else (
        root / "target" / "compare-quick" if args.quick else root / "benches")
    try:
        check_tools(args.install)
        profile = args.profile or ("dev" if args.quick else "release")
        bins = build(root, args.no_build, profile)
        if args.dir:
            os.makedirs(args.dir, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="qcowx-compare.", dir=args.dir))
        try:
            t0 = time.monotonic()
            m = machine(work)
            ctx = Ctx(args, root, bins, work)
            for name in ALL_CASES:
                if name in only:
                    log(f"case {name}")
                    CASES[name](ctx)
            results = write_report(ctx, out_dir, m, os.getloadavg(), time.monotonic() - t0,
                                   sys.argv[1:])
        finally:
            if args.keep:
                log(f"kept the images in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    except Broken as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    met = [r for r in ctx.rows if r["ok"] is True]
    judged = [r for r in ctx.rows if r["ok"] is not None]
    log(f"wrote {results} ({len(met)} of {len(judged)} targets met"
        f"{'; --quick: targets are not judged' if args.quick else ''})")
    for r in ctx.rows:
        verdict = "-" if r["ok"] is None else ("met" if r["ok"] else "MISSED")
        print(f"{r['case']:9} {verdict:6} {fmt(r['ratio']) if r['ratio'] is not None else '-':>7}  "
              f"{r['what']}: qcowx {r['qcowx']}, QEMU {r['qemu']} (target {r['target']})")
    return 0
