"""Shared harness of benches/compare: constants, the run and log helpers, medians
and number formats, the context every case writes its rows, sections and plots to,
and the Markdown tables."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


CLUSTER = 65536
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# A step of an odd number of 4 KiB blocks visits every block before it repeats, so
# 4 KiB requests land all over the disk (qemu-img bench has no random mode).
RAND_STEP = 4096 * 2053


class Broken(Exception):
    """Something did not work (as opposed to a target being missed)."""


START = time.monotonic()


def log(msg):
    print(f"compare: [{time.monotonic() - START:5.0f} s] {msg}", file=sys.stderr, flush=True)


def run(cmd, ok=(0,), **kw):
    """Runs a command; returns its stdout. Exit codes outside `ok` are failures."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode not in ok:
        raise Broken(f"{' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''} exited with "
                     f"{p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.stdout


def wall(cmd, ok=(0,)):
    """Wall time of a command in seconds (process start included)."""
    t0 = time.perf_counter()
    run(cmd, ok=ok)
    return time.perf_counter() - t0


def bench_seconds(out):
    for line in out.splitlines():
        if line.startswith("Run completed in "):
            return float(line.split()[3])
    raise Broken(f"no 'Run completed in' line in: {out.strip()}")


def fields(line):
    """key=value pairs of a qcowx-bench-tool report."""
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fresh(src, dst):
    """A copy of `src` at `dst`, on disk, with no dirty pages left anywhere (`sync`):
    what earlier cases wrote and did not flush would otherwise be written back during
    the timed run, or throttle its writes once past the kernel's dirty limits. The old
    copy is removed first: ext4 writes back a file that is truncated and rewritten
    (auto_da_alloc), which costs seconds."""
    dst = Path(dst)
    if dst.exists():
        dst.unlink()
    run(["cp", "--sparse=always", src, dst])
    os.sync()


def orders(r, items):
    """Items in the order for round r: alternating between rounds."""
    return list(items) if r % 2 == 0 else list(reversed(items))


def fmt(v, digits=2):
    if v is None or v != v:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def fmt_time(s):
    if s is None or s != s:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


class Ctx:
    def __init__(self, args, root, bins, work):
        self.args = args
        self.quick = args.quick
        self.rounds = 1 if args.quick else args.rounds
        self.root = root
        self.bins = bins
        self.work = work
        self.rows = []      # summary rows
        self.sections = []  # (title, markdown)
        self.plots = []     # (file name, svg)
        self.cache = {}

    def qcowx(self, *a):
        return [self.bins["qcowx"], *a]

    def tool(self, *a):
        return fields(run([self.bins["qcowx-bench-tool"], *a]).strip().splitlines()[-1])

    def row(self, case, what, qcowx, qemu, ratio, target, ok, note=""):
        self.rows.append(dict(case=case, what=what, qcowx=qcowx, qemu=qemu,
                              ratio=ratio, target=target, ok=ok, note=note))

    def section(self, title, text):
        self.sections.append((title, text))

    def plot(self, name, svg):
        if svg:
            self.plots.append((name, svg))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def wait_socket(path, proc=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(path).is_socket():
            return
        if proc is not None and proc.poll() is not None:
            raise Broken(f"the server for {path} exited with {proc.returncode}")
        time.sleep(0.02)
    raise Broken(f"nothing listens on {path} after {timeout} s")


def proc_status_kib(pid, key):
    """A field of /proc/PID/status in KiB, or None once the process has released its
    memory (exiting, or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
