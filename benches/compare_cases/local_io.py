"""Cases on local images through qcowx-bench and qemu-img bench: io, reads (a),
cow (c), subcluster (c2)."""

import os
import shutil

from .harness import (CLUSTER, MIB, RAND_STEP, bench_seconds, fmt, fresh, log, median, orders, run,
                      table)
from .svg import svg_plot
from .fixtures import fx_base, fx_layers


def case_io(ctx):
    """Plain reads and writes, no snapshots: qcowx-bench vs qemu-img bench."""
    base, size = fx_base(ctx)
    n = 4000 if ctx.quick else 60000
    cases = [
        ("4 KiB reads spread over the disk", False, n, ["-s", 4096, "-S", RAND_STEP]),
        ("4 KiB writes to allocated clusters", True, n,
         ["-w", "-s", 4096, "-S", RAND_STEP, "--pattern", "0x3c"]),
    ]
    run_img = ctx.work / "io-run.qcow2"
    t = {}
    for r in range(ctx.rounds):
        for i, (name, write, count, opts) in enumerate(cases):
            for prog in orders(r, ["qcowx", "qemu"]):
                img = base
                if write:
                    fresh(base, run_img)
                    img = run_img
                if prog == "qemu":
                    out = run(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", 64,
                               "-c", count, *opts, img])
                else:
                    out = run([ctx.bins["qcowx-bench"], "-f", "qcow2", "-d", 64, "-c", count, *opts, img])
                    if write and r == 0:
                        run(["qemu-img", "check", "-q", img])
                s = bench_seconds(out)
                t.setdefault((i, prog), []).append(s)
                log(f"io round {r + 1}: {prog:5} {name}: {s:.3f} s")
    rows = []
    for i, (name, write, count, opts) in enumerate(cases):
        mib = count * 4096 / MIB
        x, q = mib / median(t[i, "qcowx"]), mib / median(t[i, "qemu"])
        rows.append([name, count, fmt(x), fmt(q), fmt(x / q)])
        ctx.row("io", name + " (MiB/s)", fmt(x), fmt(q), x / q, "≥ 1 (no slower)", x / q >= 1)
    ctx.section("Plain I/O (no snapshots)", (
        f"`qcowx-bench` and `qemu-img bench` with the same options on a {size // MIB} MiB image "
        "prefilled by `qemu-io`, depth 64 (qcowx-bench: 64 threads sharing one image; "
        "qemu-img: 64 requests in flight, `-t writeback`); writes go to a fresh copy per run. "
        "Medians of MiB/s.\n\n" +
        table(["case", "requests", "qcowx MiB/s", "QEMU MiB/s", "ratio"], rows)))


def case_reads(ctx):
    """(a) 4 KiB reads through N snapshots vs an N-deep backing chain."""
    x, xd, chain, layers, depths, size = fx_layers(ctx)
    n = 4000 if ctx.quick else 60000
    # qcowx is so much faster that its runs get 4 times the requests (a few tenths of
    # a second each instead of a few hundredths: less noise); throughput is per byte.
    nx = 4 * n
    qdepths = depths if ctx.quick else [1, 4, 16, 64]
    opts = ["-s", 4096, "-S", RAND_STEP]
    # Shallow and deep runs next to each other, so a change of load hits both.
    schedule = []
    lo, hi = 0, len(depths) - 1
    while lo <= hi:
        schedule += [depths[lo]] + ([depths[hi]] if hi != lo else [])
        lo, hi = lo + 1, hi - 1
    t = {}
    for r in range(ctx.rounds):
        for d in schedule:
            progs = ["qcowx", "qemu"] if d in qdepths else ["qcowx"]
            for prog in orders(r + d, progs):
                if prog == "qemu":
                    out = run(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", 64,
                               "-c", n, *opts, chain / f"l{d}.qcow2"])
                else:
                    out = run([ctx.bins["qcowx-bench"], "-f", "qcow2", "-d", 64, "-c", nx, *opts, xd[d]])
                s = bench_seconds(out)
                t.setdefault((d, prog), []).append(s)
                log(f"reads round {r + 1}: depth {d:2}: {prog:5} {s:.3f} s")
    thr = {k: (nx if k[1] == "qcowx" else n) * 4096 / MIB / median(v) for k, v in t.items()}
    top, bottom = depths[-1], depths[0]
    rows = [[d, fmt(thr[d, "qcowx"]), fmt(thr.get((d, "qemu"))),
             fmt(thr[d, "qcowx"] / thr[d, "qemu"]) if (d, "qemu") in thr else "-"] for d in depths]
    flat = thr[top, "qcowx"] / thr[bottom, "qcowx"]
    vs = thr[top, "qcowx"] / thr[top, "qemu"]
    ctx.row("reads", f"4 KiB reads, qcowx at {top} snapshots / qcowx at {bottom} (MiB/s)",
            fmt(thr[top, "qcowx"]), fmt(thr[bottom, "qcowx"]) + " (qcowx, 1 snapshot)", flat, "≥ 0.95", flat >= 0.95)
    ctx.row("reads", f"4 KiB reads, {top} snapshots vs a {top}-deep chain (MiB/s)",
            fmt(thr[top, "qcowx"]), fmt(thr[top, "qemu"]), vs, "≥ 4", vs >= 4)
    ctx.section(f"(a) Reads through {top} snapshots", (
        f"A {size // MIB} MiB base prefilled by `qemu-io`; layer k (1..{layers}) writes pattern k+1 to the "
        "clusters c with c mod 128 in {k-1, k}. qcowx: `qcowx snapshot` before each layer, the "
        "default VDI read by `qcowx-bench`. QEMU: a backing chain of the same layers (one file per "
        "layer) read by `qemu-img bench` at its top; `qemu-img compare` checks both hold the same "
        f"bytes. Reads of 4 KiB spread over the disk (`-S {RAND_STEP}`), depth 64: {n:,} per QEMU "
        f"run, {nx:,} per qcowx run (its runs would otherwise last a few hundredths of a second); "
        f"{ctx.rounds} round(s), order alternating, shallow and deep depths side by side; medians "
        "of MiB/s.\n\n" +
        table(["snapshots / chain depth", "qcowx MiB/s", "QEMU MiB/s", "ratio"], rows) +
        "\n![reads vs depth](plots/reads-vs-depth.svg)\n"))
    ctx.plot("reads-vs-depth.svg", svg_plot(
        "4 KiB reads vs snapshot depth", "snapshots (qcowx) / backing files (QEMU) under the top",
        "MiB/s (median)",
        [("qcowx (snapshots)", [(d, thr[d, "qcowx"]) for d in depths]),
         ("QEMU (backing chain)", [(d, thr[d, "qemu"]) for d in qdepths])],
        logx=2))


def case_cow(ctx):
    """(c) 4 KiB first writes under a snapshot, 64 KiB clusters."""
    base, size = fx_base(ctx)
    n = 256 if ctx.quick else 2048
    tmpl = ctx.work / "cow.qcow2"
    shutil.copy(base, tmpl)
    run(ctx.qcowx("snapshot", "-q", tmpl, "s1"))
    run_img = ctx.work / "cow-run.qcow2"
    opts = ["-w", "-s", 4096, "-S", CLUSTER, "--pattern", "0x3c", "-c", n, "-d", 64, "-f", "qcow2"]
    t = {"qcowx": [], "qemu": []}
    # One untimed run of each first: the first copy-on-write round after the earlier
    # cases ran up to eight times slower for qcowx (the kernel's copy into new
    # page-cache pages, as in (h)) while the rounds after it did not.
    for r in range(-1, ctx.rounds):
        for prog in orders(max(r, 0), ["qcowx", "qemu"]):
            fresh(tmpl, run_img)
            if prog == "qemu":
                s = bench_seconds(run(["qemu-img", "bench", "-t", "writeback", *opts, run_img]))
            else:
                s = bench_seconds(run([ctx.bins["qcowx-bench"], *opts, run_img]))
                if r == 0:
                    run(["qemu-img", "check", "-q", run_img])
            if r < 0:
                log(f"cow warm-up: {prog:5} {s:.3f} s (not counted)")
                continue
            t[prog].append(s)
            log(f"cow round {r + 1}: {prog:5} {s:.3f} s")
    x, q = n / median(t["qcowx"]), n / median(t["qemu"])
    ctx.row("cow", "4 KiB first writes under a snapshot (IOPS)", fmt(x), fmt(q), x / q, "≥ 4", x / q >= 4)
    ctx.section("(c) Copy-on-write", (
        f"A {size // MIB} MiB image prefilled by `qemu-io`, snapshotted by `qcowx snapshot`; {n} writes "
        "of 4 KiB, one per 64 KiB cluster (`-S 65536`), each copying a shared cluster, depth 64, "
        "by `qcowx-bench -w` and by `qemu-img bench -w -t writeback` on a fresh copy of the same "
        "image per run (the qcowx-written copy must pass `qemu-img check`), after one untimed "
        f"run of each; {ctx.rounds} round(s), order alternating. Neither is asked to "
        "flush; QEMU's qcow2 driver orders its L2 and refcount updates with fdatasync on "
        "copy-on-write, qcowx only at flush and close.\n\n" +
        table(["program", "IOPS", "seconds"],
              [["qcowx-bench", fmt(x), fmt(median(t["qcowx"]), 3)],
               ["qemu-img bench", fmt(q), fmt(median(t["qemu"]), 3)]])))


def case_subcluster(ctx):
    """(c2) 4 KiB first writes into an extended-L2 overlay over a filled backing file."""
    base, size = fx_base(ctx)
    n = size // CLUSTER  # one first write into every cluster of the overlay
    tmpl = ctx.work / "sub.qcow2"
    if tmpl.exists():
        tmpl.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={CLUSTER},extended_l2=on", "-b", base, "-F", "qcow2", tmpl])
    run_img = ctx.work / "sub-run.qcow2"
    opts = ["-w", "-s", 4096, "-S", CLUSTER, "--pattern", "0x3c", "-c", n, "-d", 64, "-f", "qcow2"]
    t = {"qcowx": [], "qemu": []}
    used = {}
    for r in range(-1, ctx.rounds):
        for prog in orders(max(r, 0), ["qcowx", "qemu"]):
            fresh(tmpl, run_img)
            if prog == "qemu":
                s = bench_seconds(run(["qemu-img", "bench", "-t", "writeback", *opts, run_img]))
            else:
                s = bench_seconds(run([ctx.bins["qcowx-bench"], *opts, run_img]))
                run(["qemu-img", "check", "-q", run_img])
            used[prog] = os.stat(run_img).st_blocks * 512
            if r < 0:
                log(f"subcluster warm-up: {prog:5} {s:.3f} s (not counted)")
                continue
            t[prog].append(s)
            log(f"subcluster round {r + 1}: {prog:5} {s:.3f} s")
    x, q = n / median(t["qcowx"]), n / median(t["qemu"])
    ctx.row("subcluster", "4 KiB first writes into an extended-L2 overlay (IOPS)", fmt(x), fmt(q),
            x / q, "≥ 2", x / q >= 2)
    ctx.row("subcluster", "overlay's allocated bytes after the run", used["qcowx"], used["qemu"],
            used["qcowx"] / used["qemu"], "≤ 1.1", used["qcowx"] <= used["qemu"] * 1.1)
    ctx.section("(c2) Subclusters", (
        f"An extended-L2 overlay (64 KiB clusters, 2 KiB subclusters) over a {size // MIB} MiB "
        f"backing file prefilled by `qemu-io`; {n} writes of 4 KiB, one into each cluster (`-S 65536`), "
        "each the first into its cluster, depth 64, by `qcowx-bench -w` and by "
        "`qemu-img bench -w -t writeback` on a fresh copy of the same overlay per run (the "
        "qcowx-written copy must pass `qemu-img check`), after one untimed run of each; "
        f"{ctx.rounds} round(s), order alternating. Both allocate only the two subclusters "
        "each write covers; the allocated bytes are the overlay file's after the last run.\n\n" +
        table(["program", "IOPS", "seconds", "allocated bytes"],
              [["qcowx-bench", fmt(x), fmt(median(t["qcowx"]), 3), used["qcowx"]],
               ["qemu-img bench", fmt(q), fmt(median(t["qemu"]), 3), used["qemu"]]])))
