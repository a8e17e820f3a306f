"""Cases on snapshots: snapshots (b), gc (d), diff (e)."""

import shutil
import subprocess

from .harness import (Broken, CLUSTER, GIB, MIB, fmt, fmt_time, fresh, log, median, orders, run,
                      table, wait_socket, wall)
from .svg import svg_plot
from .fixtures import fx_gc_big, fx_layers, fx_snap_image, gc_big_count


def case_snapshots(ctx):
    """(b) Snapshot latency against the number of existing snapshots."""
    img, size = fx_snap_image(ctx)
    counts = [1, 100] if ctx.quick else [1, 100, 1000, 2000, 10000]
    lib_n = 5 if ctx.quick else 21
    # More samples of `qcowx snapshot` than of QEMU's: the ratio of its cost at 2,000
    # snapshots to its cost at 1 compares two medians of a few milliseconds each.
    cli_n = 3 if ctx.quick else 9
    q_n = 3 if ctx.quick else 5
    res = {}
    for n in counts:
        out = ctx.tool("populate", img, n)
        run(["sync"])
        log(f"snapshots: {size // GIB} GiB allocated, {n} snapshots (setup {out['total_seconds']} s)")
        if n == gc_big_count(ctx):
            ctx.cache["gc_big"] = ctx.work / "gc-big.qcow2"
            run(["cp", "--sparse=always", img, ctx.cache["gc_big"]])
        lib = ctx.tool("latency", img, lib_n)
        lib_ns = ctx.tool("latency", "--nosync", img, lib_n)
        qn = 1 if n >= 50000 else 3 if n >= 10000 else q_n
        cli, qemu = [], []
        for i in range(max(cli_n, qn)):
            for prog in orders(i, ["qcowx", "qemu"]):
                if prog == "qcowx" and i < cli_n:
                    cli.append(wall(ctx.qcowx("snapshot", "-q", img, f"cli{i}")))
                    run(ctx.qcowx("delete", "-q", img, "--snapshot", f"cli{i}"))
                elif prog == "qemu" and i < qn:
                    qemu.append(wall(["qemu-img", "snapshot", "-c", f"qemu{n}-{i}", img]))
                    if i + 1 < qn:  # each -d costs as much as a -c: the last one stays
                        run(["qemu-img", "snapshot", "-d", f"qemu{n}-{i}", img])
        run(ctx.qcowx("gc", "-q", img))
        res[n] = dict(lib=float(lib["median_us"]) / 1e6, lib_ns=float(lib_ns["median_us"]) / 1e6,
                      cli=median(cli), qemu=median(qemu), lib_n=lib_n, cli_n=cli_n, qn=qn)
        log(f"  Image::snapshot {fmt_time(res[n]['lib'])} (no fdatasync: {fmt_time(res[n]['lib_ns'])}), "
            f"qcowx snapshot {fmt_time(res[n]['cli'])}, qemu-img snapshot -c {fmt_time(res[n]['qemu'])}")
    top = counts[-1]
    r = res[top]
    ctx.row("snapshots", f"Image::snapshot with {top:,} snapshots, {size // GIB} GiB allocated (median)",
            fmt_time(r["lib"]) + f" ({fmt_time(r['lib_ns'])} without fdatasync)", "-", None,
            "≤ 1 ms", r["lib"] <= 1e-3)
    ratio = r["qemu"] / r["cli"]
    ctx.row("snapshots", f"`qcowx snapshot` vs `qemu-img snapshot -c`, {top:,} snapshots",
            fmt_time(r["cli"]), fmt_time(r["qemu"]), ratio, "≥ 20", ratio >= 20)
    # Issue 16: a snapshot costs what changed, not what the image holds.
    many = 2000 if 2000 in res else counts[-1]
    growth = res[many]["cli"] / res[1]["cli"]
    ctx.row("snapshots", f"`qcowx snapshot` with {many:,} vs 1 existing snapshots "
            f"(ratio: cost at {many:,} / cost at 1)",
            f"{fmt_time(res[many]['cli'])} vs {fmt_time(res[1]['cli'])}",
            f"{fmt_time(res[many]['qemu'])} vs {fmt_time(res[1]['qemu'])} (qemu-img)",
            growth, "≤ 1.2", growth <= 1.2)
    rows = [[f"{n:,}", fmt_time(v["lib"]), fmt_time(v["lib_ns"]), fmt_time(v["cli"]),
             fmt_time(v["qemu"]), fmt(v["qemu"] / v["cli"])] for n, v in res.items()]
    ctx.section(f"(b) Snapshot creation with up to {top:,} snapshots", (
        f"An image with {size // GIB} GiB allocated (`qemu-img create -o preallocation=metadata`: every "
        "cluster has an L2 entry and a refcount, no data is written, the file stays sparse), "
        "grown from one count to the next by `Image::snapshot` (setup: `qcowx-bench-tool populate`, "
        "fdatasync suppressed, one sync at the end). At each count: `Image::snapshot` alone "
        f"({lib_n} samples in one open image, each deleted again), the same on storage whose "
        "fdatasync does nothing (what the code and its writes cost without the disk flushes), "
        f"`qcowx snapshot FILE NAME` (wall time, process start, open and close included; "
        f"{cli_n} samples, each deleted again) and `qemu-img snapshot -c` on the same image "
        f"({q_n} samples, 3 at 10,000), alternating. Medians. The ratio of `qcowx snapshot`'s "
        f"median at {many:,} snapshots to its median at 1 is the cost of the snapshots already "
        "there (target ≤ 1.2: open, snapshot and close read and write what changed, not every "
        "snapshot's L1 table).\n\n" +
        table(["snapshots", "Image::snapshot", "same, no fdatasync", "qcowx snapshot (CLI)",
               "qemu-img snapshot -c", "QEMU / CLI"], rows) +
        "\n![snapshot latency](plots/snapshot-latency.svg)\n"))
    ctx.plot("snapshot-latency.svg", svg_plot(
        f"Snapshot creation, {size // GIB} GiB allocated", "existing snapshots",
        "milliseconds (median)",
        [("qemu-img snapshot -c", [(n, v["qemu"] * 1e3) for n, v in res.items()]),
         ("qcowx snapshot (CLI)", [(n, v["cli"] * 1e3) for n, v in res.items()]),
         ("Image::snapshot", [(n, v["lib"] * 1e3) for n, v in res.items()]),
         ("Image::snapshot, no fdatasync", [(n, v["lib_ns"] * 1e3) for n, v in res.items()])],
        logx=10, logy=10))


def case_gc(ctx):
    """(d) gc of one deleted snapshot, the others kept, beside qemu-img check -r all."""
    x, xd, chain, layers, depths, size = fx_layers(ctx)
    big = fx_gc_big(ctx)
    images = []
    small = ctx.work / "gc-small.qcow2"
    shutil.copy(x, small)
    mid = layers // 2
    run(ctx.qcowx("delete", "-q", small, "--snapshot", f"s{mid}"))
    images.append((small, f"{size // MIB} MiB, {layers} snapshots, s{mid} deleted"))
    run(ctx.qcowx("delete", "-q", big, "--snapshot", "victim"))
    gb = 1 if ctx.quick else 16
    images.append((big, f"{gb} GiB allocated, {gc_big_count(ctx):,} snapshots, one deleted"))
    run(["sync"])
    run_img = ctx.work / "gc-run.qcow2"

    def nsnap(p):
        return len(run(["qemu-img", "snapshot", "-l", p]).splitlines()[2:])

    res = {}
    for r in range(ctx.rounds):
        for g, (img, label) in enumerate(images):
            for prog in orders(r, ["lib", "scan", "cli", "qemu"]):
                fresh(img, run_img)
                if prog == "lib":
                    out = ctx.tool("gc", run_img)
                    s = float(out["gc_s"])
                    res.setdefault((g, "freed"), []).append(int(out["bytes_freed"]))
                elif prog == "scan":
                    s = float(ctx.tool("gc", "--nosync", run_img)["gc_s"])
                elif prog == "cli":
                    s = wall(ctx.qcowx("gc", "-q", run_img))
                    if r == 0:
                        run(["qemu-img", "check", "-q", run_img])
                else:
                    before = nsnap(run_img)
                    s = wall(["qemu-img", "check", "-q", "-r", "all", run_img])
                    if r == 0 and nsnap(run_img) != before:
                        raise Broken("qemu-img check -r all dropped snapshots")
                res.setdefault((g, prog), []).append(s)
                log(f"gc round {r + 1}: {label}: {prog:4} {s:.3f} s")
    rows = []
    for g, (img, label) in enumerate(images):
        flen = img.stat().st_size
        lib, scan, cli, qemu = (median(res[g, p]) for p in ("lib", "scan", "cli", "qemu"))
        gbs, gbs_lib = flen / 1e9 / scan, flen / 1e9 / lib
        rows.append([label, fmt(flen / MIB), fmt(median(res[g, "freed"]) / MIB), fmt_time(scan),
                     fmt(gbs), fmt_time(lib), fmt(gbs_lib), fmt_time(cli), fmt_time(qemu),
                     fmt(qemu / cli)])
        ctx.row("gc", f"gc, {label} (GB of image file per second of Image::gc without fdatasync)",
                f"{fmt(gbs)} GB/s ({fmt(gbs_lib)} GB/s with fdatasync)",
                f"check -r all: {fmt_time(qemu)}", None, "≥ 10 GB/s", gbs >= 10)
    ctx.section("(d) Reclaiming a deleted snapshot's space", (
        "One snapshot is deleted (`qcowx delete`: a flag) and gc gives its space back while every "
        "other snapshot stays. QEMU has no such operation that keeps the other snapshots; beside it "
        "is `qemu-img check -r all` on the same state (it too reads every snapshot's tables and "
        "rebuilds the refcounts). Every run works on a fresh copy; round 1 checks the image with "
        "`qemu-img check` after `qcowx gc` and that `check -r all` kept every snapshot. GB/s = "
        "image file length (10^9 bytes) / time of `Image::gc` alone (`qcowx-bench-tool gc`: open "
        "and close not counted). The target is about the metadata scan, so it is judged on "
        "`Image::gc` on storage whose fdatasync does nothing (`gc --nosync`: the scan and its "
        "writes to the page cache); the durable `Image::gc` beside it adds the disk flushes of "
        "its commit. `qcowx gc` is the command's wall time (open, gc, close).\n\n" +
        table(["image", "file MiB", "freed MiB", "Image::gc, no fdatasync", "GB/s",
               "Image::gc", "GB/s", "qcowx gc (CLI)", "qemu-img check -r all", "check / CLI"],
              rows)))


def case_diff(ctx):
    """(e) diff of two snapshots 1% apart vs qemu-img compare of the two snapshots."""
    size = 1 * GIB if ctx.quick else 16 * GIB
    data = 64 * MIB if ctx.quick else 1 * GIB
    img = ctx.work / "diff.qcow2"
    clusters = size // CLUSTER
    changed = clusters // 100
    log(f"diff: {size // GIB} GiB image, {data // MIB} MiB of data at its end, 1% = {changed} clusters")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img, size])
    # qemu-io takes at most about 2 GiB a request: write the data 1 GiB at a time.
    fill = []
    for off in range(size - data, size, GIB):
        fill += ["-c", f"write -q -P 0x5a {off} {min(GIB, size - off)}"]
    run(["qemu-io", "-f", "qcow2", *fill, img])
    run(ctx.qcowx("snapshot", "-q", img, "a"))
    tail = []
    for c in range(clusters - changed, clusters):
        tail += ["-c", f"write -q -P 0x3c {c * CLUSTER} 4096"]
    run(ctx.qcowx("io", *tail, img))
    run(ctx.qcowx("snapshot", "-q", img, "b"))
    spread = []
    for c in range(0, clusters, 100):
        spread += ["-c", f"write -q -P 0x4d {c * CLUSTER} 4096"]
    run(ctx.qcowx("io", *spread, img))
    run(ctx.qcowx("snapshot", "-q", img, "c"))
    run(["sync"])
    samples = 5 if ctx.quick else 21
    socks = {s: ctx.work / f"diff-{s}.sock" for s in "ab"}
    procs = []
    try:
        for s, sock in socks.items():
            procs.append(subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-l",
                                           f"snapshot.name={s}", "-k", sock, img],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for sock in socks.values():
            wait_socket(sock)
        uris = [f"nbd+unix:///?socket={socks[s]}" for s in "ab"]
        t = {}
        for r in range(ctx.rounds):
            for prog in orders(r, ["lib", "cli", "qemu"]):
                if prog == "lib":
                    out = ctx.tool("diff", img, "a", "b", samples)
                    s = float(out["median_us"]) / 1e6
                    if int(out["bytes"]) != changed * CLUSTER:
                        raise Broken(f"diff a b: {out}")
                    out = ctx.tool("diff", img, "b", "c", samples)
                    t.setdefault("lib-spread", []).append(float(out["median_us"]) / 1e6)
                elif prog == "cli":
                    s = wall(ctx.qcowx("diff", "-q", img, "a", "b"))
                    t.setdefault("cli-spread", []).append(wall(ctx.qcowx("diff", "-q", img, "b", "c")))
                else:
                    # Exit status 1: the images differ (as they must).
                    s = wall(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", *uris], ok=(1,))
                t.setdefault(prog, []).append(s)
                log(f"diff round {r + 1}: {prog:4} {s:.4f} s")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    lib, cli, qemu = (median(t[p]) for p in ("lib", "cli", "qemu"))
    ratio = qemu / cli
    ctx.row("diff", f"diff of two snapshots 1% apart, {size // GIB} GiB image",
            fmt_time(cli) + f" (library {fmt_time(lib)})", fmt_time(qemu), ratio, "≥ 50", ratio >= 50)
    ctx.section("(e) Diff of two snapshots", (
        f"A {size // GIB} GiB image (64 KiB clusters) whose "
        + ("every cluster holds" if data == size else f"last {data // MIB} MiB hold")
        + f" data (`qemu-io`, one byte pattern); snapshot `a`; one 4 KiB write into each of the last 1% of the clusters "
        f"({changed:,} clusters); snapshot `b`. `qemu-img compare` only says same or different and "
        "stops at the first difference, so the change sits at the end of the disk: it has to compare "
        "all that comes before (the whole content, as any listing of differences would) — the data "
        "it reads, the rest skipped by block status. QEMU cannot open an internal snapshot in "
        "`qemu-img compare` itself: each snapshot is served read-only by `qemu-nbd -r -l "
        "snapshot.name=…` (started once, not timed) and `qemu-img compare` reads both over NBD. "
        "`qcowx diff FILE a b` lists the changed ranges (wall time, process start and open "
        "included); `Image::diff` alone is the library call. A third snapshot `c` rewrites every "
        "100th cluster of the whole disk after `b` (1% spread everywhere: every L2 table differs), "
        "for qcowx only.\n\n" +
        table(["pair", "qcowx diff (CLI)", "Image::diff", "qemu-img compare over NBD", "QEMU / CLI"],
              [["a → b (last 1%)", fmt_time(cli), fmt_time(lib), fmt_time(qemu), fmt(ratio)],
               ["b → c (every 100th cluster)", fmt_time(median(t["cli-spread"])),
                fmt_time(median(t["lib-spread"])), "-", "-"]])))
