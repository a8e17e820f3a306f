"""The machine description and the writing of RESULTS.md and plots/."""

import datetime
import os
import platform
import subprocess
import time

from .harness import fmt, fmt_time, median, table


ANALYSIS_MARK = "<!-- analysis -->"


def machine(work):
    def first(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "not installed"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / (1 << 20)
    fstype = first(["findmnt", "-n", "-o", "FSTYPE", "-T", str(work)])
    # fdatasync latency of a 4 KiB overwrite in the work folder.
    probe = work / "fsync-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    lat = []
    try:
        for i in range(20):
            os.pwrite(fd, os.urandom(4096), 4096 * (i % 4))
            t0 = time.perf_counter()
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        probe.unlink()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "mem": f"{mem:.0f} GiB",
        "kernel": platform.release(),
        "qemu": first(["qemu-img", "--version"]),
        "fio": first(["fio", "--version"]),
        "nbdkit": first(["nbdkit", "--version"]),
        "fs": fstype,
        "fdatasync": median(lat),
        "load": os.getloadavg(),
    }


def write_report(ctx, out_dir, m, load_end, elapsed, argv):
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for name, svg in ctx.plots:
        (plots / name).write_text(svg)
    results = out_dir / "RESULTS.md"
    kept = ""
    if results.exists():
        old = results.read_text()
        if ANALYSIS_MARK in old:
            kept = old.split(ANALYSIS_MARK, 1)[1]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# qcowx beside QEMU: measured results", "",
          f"Written by `benches/compare{(' ' + ' '.join(argv)) if argv else ''}` on {now} "
          f"(the cases took {elapsed / 60:.1f} minutes). Every number is a median of alternating runs on the same "
          "images; ratios are qcowx / QEMU (> 1: qcowx ahead) unless the row says otherwise.", ""]
    if ctx.quick:
        md += ["**`--quick` run: small images, one short round — a smoke test; the numbers mean "
               "nothing.**", ""]
    md += ["## Machine", "",
           f"- {m['cores']} CPU core(s): {m['cpu']}; {m['mem']} RAM; Linux {m['kernel']}",
           f"- {m['qemu']}; {m['fio']}; nbdkit: {m['nbdkit']}",
           f"- images on {m['fs']} (`{ctx.work}`), through the page cache; fdatasync of a 4 KiB "
           f"overwrite there: {fmt_time(m['fdatasync'])} (median of 20)",
           f"- load average {m['load'][0]:.2f} at the start, {load_end[0]:.2f} at the end. "
           "The machine is shared with other builds and test runs: expect noise of tens of percent "
           "between runs, more on the NBD rows, whose client and server compete for the same two "
           "cores.", "",
           "## Targets", "",
           table(["case", "measure", "qcowx", "QEMU", "ratio", "target", "result"],
                 [[r["case"], r["what"], r["qcowx"], r["qemu"], fmt(r["ratio"]) if r["ratio"] is not None else "-",
                   r["target"], "-" if r["ok"] is None else ("**met**" if r["ok"] else "**missed**")]
                  for r in ctx.rows]), ""]
    for title, text in ctx.sections:
        md += [f"## {title}", "", text, ""]
    md += [ANALYSIS_MARK]
    text = "\n".join(md) + (kept if kept else "\n")
    results.write_text(text)
    return results
