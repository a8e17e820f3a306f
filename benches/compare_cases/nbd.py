"""NBD cases through fio's nbd engine: nbd (f, g) and disk (issue 18)."""

import json
import os
import shutil
import signal
import subprocess

from .harness import (Broken, GIB, KIB, MIB, fmt, fresh, log, median, orders, proc_status_kib, run,
                      table, wait_socket, wall)
from .fixtures import fx_base, fx_disk


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def case_nbd(ctx):
    """(f, g) fio's nbd engine against qcowx-nbd, qemu-nbd and nbdkit memory."""
    base, size = fx_base(ctx)
    runtime = 1 if ctx.quick else 3
    have_nbdkit = shutil.which("nbdkit") is not None and subprocess.run(
        ["nbdkit", "memory", "--dump-plugin"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL).returncode == 0
    servers = ["qemu", "qcowx"] + (["nbdkit"] if have_nbdkit else [])
    if not have_nbdkit:
        log("nbdkit is not installed (Debian package nbdkit; --install installs it): no nbdkit column")
    cases = [("4 KiB random reads", ["--rw=randread", "--bs=4k"]),
             ("4 KiB random writes", ["--rw=randwrite", "--bs=4k"]),
             ("1 MiB sequential reads", ["--rw=read", "--bs=1M"]),
             ("1 MiB sequential writes", ["--rw=write", "--bs=1M"])]
    sock = ctx.work / "nbd.sock"
    img = ctx.work / "nbd-run.qcow2"
    fio_out = ctx.work / "fio.json"
    res = {}
    for r in range(ctx.rounds):
        for srv in orders(r, servers):
            if sock.exists():
                sock.unlink()
            if srv == "qemu":
                fresh(base, img)
                cmd = ["qemu-nbd", "-f", "qcow2", "-t", "-k", sock, img]
                uri = f"nbd+unix:///?socket={sock}"
            elif srv == "qcowx":
                fresh(base, img)
                cmd = [ctx.bins["qcowx-nbd"], "-t", "--no-control", "-k", sock, img]
                uri = f"nbd+unix:///default?socket={sock}"
            else:
                cmd = ["nbdkit", "-f", "-U", sock, "memory", f"size={size}"]
                uri = f"nbd+unix:///?socket={sock}"
            p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            try:
                wait_socket(sock, p)
                if srv == "nbdkit":
                    run(["qemu-io", "-f", "raw", "-c", f"write -q -P 0xa5 0 {size}", uri])
                for i, (name, opts) in enumerate(cases):
                    c0 = cpu_seconds(p.pid)
                    run(["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
                         "--iodepth=16", "--numjobs=1", "--time_based", f"--runtime={runtime}",
                         "--norandommap", "--randrepeat=0", "--output-format=json",
                         f"--output={fio_out}", *opts])
                    cpu = cpu_seconds(p.pid) - c0
                    j = json.loads(fio_out.read_text())["jobs"][0]
                    if j["error"]:
                        raise Broken(f"fio reported error {j['error']} on {srv}")
                    d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
                    ios = d["total_ios"] or 1
                    res.setdefault((i, srv), []).append(
                        (d["bw_bytes"] / MIB, d["iops"], cpu / ios * 1e6,
                         j["usr_cpu"] + j["sys_cpu"]))
                    log(f"nbd round {r + 1}: {srv:6} {name}: {d['bw_bytes'] / MIB:.0f} MiB/s, "
                        f"server {cpu / ios * 1e6:.1f} µs CPU/request")
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    raise Broken(f"{srv} did not stop on SIGTERM")
            if srv == "qcowx":
                if p.returncode != 0:
                    raise Broken(f"qcowx-nbd exited with {p.returncode}")
                run(["qemu-img", "check", "-q", img])

    def med(i, srv, k):
        return median([v[k] for v in res[i, srv]]) if (i, srv) in res else None

    rows = []
    for i, (name, opts) in enumerate(cases):
        x, q, k = med(i, "qcowx", 0), med(i, "qemu", 0), med(i, "nbdkit", 0)
        small = name.startswith("4 KiB")
        cell = lambda s: (f"{fmt(med(i, s, 0))} ({med(i, s, 1) / 1000:.0f}k IOPS)" if small
                          else fmt(med(i, s, 0))) if (i, s) in res else "-"
        rows.append([name, cell("qcowx"), cell("qemu"), fmt(x / q), cell("nbdkit"),
                     fmt(x / k) if k else "-",
                     " / ".join(fmt(med(i, s, 2), 1) if (i, s) in res else "-" for s in servers),
                     " / ".join(fmt(med(i, s, 3), 0) + "%" if (i, s) in res else "-" for s in servers)])
        ctx.row("nbd", f"NBD {name}, QD 16 (MiB/s)", fmt(x), fmt(q), x / q, "≥ 2", x / q >= 2)
        if name == "1 MiB sequential reads":
            ctx.row("nbd", "NBD 1 MiB sequential reads vs nbdkit memory (MiB/s)", fmt(x),
                    fmt(k) + " (nbdkit)" if k else "nbdkit not installed",
                    x / k if k else None, "≥ 0.8 × nbdkit", (x / k >= 0.8) if k else None)
    ctx.section("(f, g) NBD", (
        f"fio's nbd engine (libnbd, one connection, `--iodepth 16`, {runtime} s per case, time-based) "
        f"on a Unix socket against `qcowx-nbd -t --no-control` and `qemu-nbd -f qcow2 -t` serving a "
        f"fresh copy of a {size // MIB} MiB image prefilled by `qemu-io` (64 KiB clusters; both with "
        "their defaults: writeback cache, no flushes asked), and against `nbdkit memory` (prefilled "
        "over NBD: no image format, no file; a reference server, not a ceiling: it copies each byte "
        "twice). "
        f"{ctx.rounds} round(s), server order alternating; medians. Server CPU is the server "
        "process's user+system time over the run divided by the requests fio completed; fio CPU is "
        "fio's own (usr+sys, % of one core). The qcowx-nbd image must pass `qemu-img check` after "
        "each run.\n\n" +
        table(["case", "qcowx-nbd MiB/s", "qemu-nbd MiB/s", "ratio", "nbdkit memory MiB/s",
               "qcowx / nbdkit", "server CPU µs/request (" + " / ".join(servers) + ")",
               "fio CPU (" + " / ".join(servers) + ")"], rows)))


def small_folios(img):
    """Drops `img`'s pages from the page cache (it is synced: they are clean) and reads
    it back with readahead off (`POSIX_FADV_RANDOM`), so the page cache holds it in
    4 KiB pages rather than the large folios a copy or a sequential read leaves."""
    fd = os.open(img, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        while os.read(fd, MIB):
            pass
    finally:
        os.close(fd)


def fio_nbd(ctx, uri, size, runtime, rw, jobs, pid):
    """One fio run of 4 KiB requests at QD 16 per connection over `jobs` connections:
    (IOPS, server CPU µs per request)."""
    out = ctx.work / "fio-disk.json"
    c0 = cpu_seconds(pid)
    run(["fio", "--name=disk", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
         f"--rw={rw}", "--bs=4k", "--iodepth=16", f"--numjobs={jobs}", "--group_reporting",
         "--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0",
         "--output-format=json", f"--output={out}"])
    cpu = cpu_seconds(pid) - c0
    j = json.loads(out.read_text())["jobs"][0]
    if j["error"]:
        raise Broken(f"fio reported error {j['error']}")
    d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
    return d["iops"], cpu / (d["total_ios"] or 1) * 1e6


def case_disk(ctx):
    """Issue 18: a disk QEMU wrote, served by qcowx-nbd and qemu-nbd: 4 KiB random
    reads and overwrites, reads over 1, 2 and 4 connections, and the peak RSS after
    the whole disk has been read."""
    base, size = fx_disk(ctx)
    runtime = 1 if ctx.quick else 3
    sock = ctx.work / "disk.sock"
    img = ctx.work / "disk-run.qcow2"
    res = {}
    conns = [1, 2, 4]
    for r in range(ctx.rounds):
        for srv in orders(r, ["qemu", "qcowx"]):
            for state in ("copied", "4k-pages"):
                fresh(base, img)
                if state == "4k-pages":
                    small_folios(img)
                if sock.exists():
                    sock.unlink()
                if srv == "qcowx":
                    cmd = [ctx.bins["qcowx-nbd"], "-t", "--no-control", "-k", sock, img]
                    uri = f"nbd+unix:///default?socket={sock}"
                else:
                    cmd = ["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "-k", sock, img]
                    uri = f"nbd+unix:///?socket={sock}"
                p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
                try:
                    wait_socket(sock, p)
                    got = {}
                    if state == "copied":
                        for n in conns:
                            got[f"read{n}"] = fio_nbd(ctx, uri, size, runtime, "randread", n, p.pid)
                    else:
                        got["read1"] = fio_nbd(ctx, uri, size, runtime, "randread", 1, p.pid)
                    got["write"] = fio_nbd(ctx, uri, size, runtime, "randwrite", 1, p.pid)
                    if state == "copied":
                        # The same again: what a server's overwrites cost once the
                        # first pass has paid for whatever it does once per page
                        # (the pages are dirty now, for both servers alike).
                        got["write2"] = fio_nbd(ctx, uri, size, runtime, "randwrite", 1, p.pid)
                        # The whole disk, end to end, once: 256 KiB sequential reads.
                        got["copy"] = (wall(["fio", "--name=whole", "--ioengine=nbd",
                                             f"--uri={uri}", f"--size={size}", "--rw=read",
                                             "--bs=256k", "--iodepth=16",
                                             "--output=/dev/null"]), 0)
                        got["hwm"] = (proc_status_kib(p.pid, "VmHWM"), 0)
                    for k, v in got.items():
                        res.setdefault((srv, state, k), []).append(v)
                    log(f"disk round {r + 1}: {srv:5} {state:8} " + ", ".join(
                        f"{k} {v[0] / 1000:.0f}k IOPS ({v[1]:.1f} µs CPU)" if k.startswith(("read", "write"))
                        else f"{k} {v[0]:.2f}" for k, v in got.items()))
                finally:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                        raise Broken(f"{srv} did not stop on SIGTERM")
                if srv == "qcowx":
                    if p.returncode != 0:
                        raise Broken(f"qcowx-nbd exited with {p.returncode}")
                    run(["qemu-img", "check", "-q", img])
    img.unlink()

    def med(srv, state, k, i=0):
        return median([v[i] for v in res.get((srv, state, k), [])])

    gib = f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"
    xr, xw = med("qcowx", "copied", "read1"), med("qcowx", "copied", "write")
    qr, qw = med("qemu", "copied", "read1"), med("qemu", "copied", "write")
    ctx.row("disk", f"4 KiB random overwrites vs 4 KiB random reads, same server ({gib} QEMU wrote, "
            "copied with cp; IOPS)", f"{xw / 1000:.0f}k vs {xr / 1000:.0f}k",
            f"{qw / 1000:.0f}k vs {qr / 1000:.0f}k (qemu-nbd)", xw / xr, "≥ 0.8", xw / xr >= 0.8)
    ctx.row("disk", f"4 KiB random overwrites, QD 16 ({gib}; IOPS)", f"{xw / 1000:.0f}k",
            f"{qw / 1000:.0f}k", xw / qw, "≥ 3", xw / qw >= 3)
    ctx.row("disk", f"4 KiB random reads, QD 16 ({gib}; IOPS)", f"{xr / 1000:.0f}k",
            f"{qr / 1000:.0f}k", xr / qr, "≥ 4", xr / qr >= 4)
    xw2, qw2 = med("qcowx", "copied", "write2"), med("qemu", "copied", "write2")
    ctx.row("disk", "4 KiB random overwrites vs reads, a second overwrite run on the same server "
            "(IOPS; information)", f"{xw2 / 1000:.0f}k vs {xr / 1000:.0f}k",
            f"{qw2 / 1000:.0f}k vs {qr / 1000:.0f}k (qemu-nbd)", xw2 / xr, "-", None)
    sr, sw = med("qcowx", "4k-pages", "read1"), med("qcowx", "4k-pages", "write")
    qsr, qsw = med("qemu", "4k-pages", "read1"), med("qemu", "4k-pages", "write")
    ctx.row("disk", "4 KiB random overwrites vs reads, the copy's pages read back 4 KiB at a time "
            "(IOPS; information)", f"{sw / 1000:.0f}k vs {sr / 1000:.0f}k",
            f"{qsw / 1000:.0f}k vs {qsr / 1000:.0f}k (qemu-nbd)", sw / sr, "-", None)
    x4, x1 = med("qcowx", "copied", "read4"), xr
    q4 = med("qemu", "copied", "read4")
    ctx.row("disk", f"4 KiB random reads, 4 connections vs 1 (IOPS; {os.cpu_count()} cores)",
            f"{x4 / 1000:.0f}k vs {x1 / 1000:.0f}k", f"{q4 / 1000:.0f}k vs {qr / 1000:.0f}k "
            f"(qemu-nbd: {q4 / qr:.2f})", x4 / x1, "≥ 1.5", x4 / x1 >= 1.5)
    # The configured caches: the L2 table cache (qcowx-nbd's default, 8 MiB).
    l2 = 8 * MIB
    xh, qh = med("qcowx", "copied", "hwm"), med("qemu", "copied", "hwm")
    ctx.row("disk", f"peak RSS after reading the whole {gib} (VmHWM; L2 cache {l2 // MIB} MiB)",
            f"{xh / KIB:.1f} MiB", f"{qh / KIB:.1f} MiB", None,
            f"≤ 64 MiB + {l2 // MIB} MiB", xh * KIB <= 64 * MIB + l2)
    rows = []
    for srv in ("qcowx", "qemu"):
        rows.append([f"{srv}-nbd"] +
                    [f"{med(srv, 'copied', f'read{n}') / 1000:.0f}k ({med(srv, 'copied', f'read{n}', 1):.1f})"
                     for n in conns] +
                    [f"{med(srv, 'copied', 'write') / 1000:.0f}k ({med(srv, 'copied', 'write', 1):.1f})",
                     f"{med(srv, 'copied', 'write2') / 1000:.0f}k ({med(srv, 'copied', 'write2', 1):.1f})",
                     f"{med(srv, '4k-pages', 'read1') / 1000:.0f}k ({med(srv, '4k-pages', 'read1', 1):.1f})",
                     f"{med(srv, '4k-pages', 'write') / 1000:.0f}k ({med(srv, '4k-pages', 'write', 1):.1f})",
                     f"{size / MIB / med(srv, 'copied', 'copy'):,.0f}",
                     f"{med(srv, 'copied', 'hwm') / KIB:.1f}"])
    ctx.section("Issue 18: a disk QEMU wrote, over NBD", (
        f"A {gib} qcow2 image written whole by `qemu-io` (64 KiB clusters: every cluster "
        "allocated), served from a fresh copy (`cp`, then `sync`) by `qcowx-nbd -t --no-control` "
        "and `qemu-nbd -f qcow2 -t -e 4`, alternating, "
        f"{ctx.rounds} round(s), medians. fio's nbd engine, 4 KiB requests at random over the "
        f"whole disk, QD 16 per connection, {runtime} s per case; several connections are fio "
        "jobs (`--numjobs`), summed. Each server run: reads over 1, 2 and 4 connections, then "
        "overwrites over one, twice (the second run on pages the first made dirty), then fio reads the whole disk once (256 KiB sequential reads, QD 16; "
        "MiB/s, fio's start included), then the "
        "server's VmHWM. A second run per server starts from a copy whose pages were dropped "
        "from the page cache and read back with readahead off (4 KiB pages instead of the large "
        "folios `cp` leaves), then reads and overwrites. Cells: IOPS (server CPU µs per "
        "request). The qcowx copies must pass `qemu-img check`.\n\n" +
        table(["server", "reads, 1 conn", "reads, 2 conns", "reads, 4 conns", "overwrites",
               "overwrites, second run",
               "reads, 4 KiB pages", "overwrites, 4 KiB pages", "whole disk MiB/s",
               "VmHWM MiB"], rows)))
