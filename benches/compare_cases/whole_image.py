"""Whole-image commands: scan (issue 16), import (h), send (i), large."""

import os
import subprocess
import time

from .harness import (Broken, CLUSTER, GIB, KIB, MIB, fmt, fmt_time, fresh, log, median, orders,
                      proc_status_kib, run, table, wall)
from .fixtures import fx_layers


# Rounds of the import case at least (its runs take a fraction of a second each).
IMPORT_ROUNDS = 5


def peak_rss_kib(cmd, ok=(0,)):
    """Runs `cmd` (output discarded) and returns its peak resident memory (KiB: the
    highest VmHWM read from /proc/PID/status, polled every millisecond until it exits)
    and wall time. (The kernel's ru_maxrss of a child is no use here: it counts the
    forking Python process's own size before the exec.)"""
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        peak = max(peak, proc_status_kib(p.pid, "VmHWM") or 0)
        time.sleep(0.001)
    took = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode not in ok:
        raise Broken(f"{' '.join(map(str, cmd))} exited {p.returncode}: {err[-500:]}")
    return peak, took


def case_scan(ctx):
    """Issue 16: the memory of a full scan (check, repair, gc) beside qemu-img check's."""
    size = 16 * GIB if ctx.quick else 1 << 40
    label = f"{size // GIB} GiB" if size < (1 << 40) else f"{size >> 40} TiB"
    img = ctx.work / "scan.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, str(size)])
    copy = ctx.work / "scan-copy.qcow2"
    cmds = {
        "qemu-img check": lambda f: ["qemu-img", "check", "-q", f],
        "qcowx check": lambda f: ctx.qcowx("check", f),
        "qcowx check --repair": lambda f: ctx.qcowx("check", "--repair", f),
        "qcowx gc": lambda f: ctx.qcowx("gc", f),
    }
    res = {k: [] for k in cmds}
    for r in range(ctx.rounds):
        for prog in orders(r, list(cmds)):
            fresh(img, copy)
            kib, took = peak_rss_kib(cmds[prog](copy))
            res[prog].append((kib, took))
            log(f"scan {label} round {r + 1}: {prog:21} peak RSS {kib / KIB:.1f} MiB, {fmt_time(took)}")
            if prog != "qemu-img check":
                run(["qemu-img", "check", "-q", copy])
    copy.unlink()
    img.unlink()

    def med(prog, k):
        return median([v[k] for v in res[prog]])

    q = med("qemu-img check", 0)
    for prog in ("qcowx check", "qcowx check --repair", "qcowx gc"):
        x = med(prog, 0)
        ctx.row("scan", f"peak RSS of `{prog}` vs `qemu-img check`, {label} allocated",
                f"{x / KIB:.1f} MiB", f"{q / KIB:.1f} MiB", q / x, "≤ qemu-img check's (≥ 1)",
                x <= q)
    ctx.section(f"Full scans of {label} (issue 16)", (
        f"An image of {label} with every cluster allocated (`qemu-img create -f qcow2 -o "
        "preallocation=metadata`, 64 KiB clusters: L2 entries and refcounts, no data, sparse); "
        f"each run on a fresh copy, {ctx.rounds} round(s), order alternating, medians. Peak RSS "
        "is the highest VmHWM of the process (`/proc/PID/status`, polled every millisecond until "
        "it exits). Every copy qcowx ran on "
        "passes `qemu-img check` after it.\n\n" +
        table(["program", "peak RSS MiB", "wall time"],
              [[p, f"{med(p, 0) / KIB:.1f}", fmt_time(med(p, 1))] for p in cmds])))


def case_import(ctx):
    """(h) qcowx import of a deep chain vs qemu-img convert of it."""
    x, xd, chain, layers, depths, size = fx_layers(ctx)
    top = chain / f"l{layers}.qcow2"
    outs = {"qcowx": ctx.work / "import-x.qcow2", "qcowx-ns": ctx.work / "import-xns.qcow2",
            "qemu": ctx.work / "import-q.qcow2", "qemu-wb": ctx.work / "import-qwb.qcow2"}
    cmds = {"qcowx": ctx.qcowx("import", "-q", top, outs["qcowx"]),
            "qcowx-ns": ctx.qcowx("import", "-q", "--no-sync", top, outs["qcowx-ns"]),
            "qemu": ["qemu-img", "convert", "-O", "qcow2", top, outs["qemu"]],
            "qemu-wb": ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", top,
                        outs["qemu-wb"]]}
    t = {p: [] for p in cmds}
    # One untimed run of each first: the first runs after the earlier cases were up to
    # three times slower for whichever program came first (the kernel's copy into new
    # page-cache pages, by `time`'s system time), whatever the program.
    rounds = ctx.rounds if ctx.quick else max(ctx.rounds, IMPORT_ROUNDS)
    for r in range(-1, rounds):
        for prog in orders(max(r, 0), list(cmds)):
            out = outs[prog]
            if out.exists():
                out.unlink()
            # Start from no dirty pages: convert leaves its output unwritten, and its
            # writeback would otherwise land on whichever run comes next.
            os.sync()
            s = wall(cmds[prog])
            if r < 0:
                log(f"import warm-up: {prog:8} {s:.3f} s (not counted)")
                continue
            if prog.startswith("qcowx") and r == 0:
                run(["qemu-img", "check", "-q", out])
                if subprocess.run(["qemu-img", "compare", "-q", out, top]).returncode != 0:
                    raise Broken(f"{prog} import: the default VDI differs from the chain's top")
            t[prog].append(s)
            log(f"import round {r + 1}: {prog:8} {s:.3f} s")
    x_s, ns_s, q_s, w_s = (median(t[p]) for p in cmds)
    ctx.row("import", f"import of a {layers}-deep chain ({size // MIB} MiB) vs qemu-img convert, "
            "neither waiting for the disk (`import --no-sync`, convert's default)",
            fmt_time(ns_s), fmt_time(q_s), q_s / ns_s, "> 1 (faster)", q_s / ns_s > 1)

    def size_of(p):
        return fmt(outs[p].stat().st_size / MIB) if outs[p].exists() else "-"

    ctx.section("(h) Import of a backing chain", (
        f"The {layers}-deep chain of (a) ({size // MIB} MiB base, {layers} layers of 1/64 of the disk). "
        f"`qcowx import TOP OUT` keeps every layer (each becomes a snapshot; it copies what each "
        "layer stores) and `qemu-img convert -O qcow2 TOP OUT` flattens the chain into one image "
        "(it copies what the top reads as); wall times, output removed and `sync` run before "
        f"each run; one untimed run of each, then {rounds} rounds, order alternating. Both come in two kinds, and each is compared with "
        "its like. `qemu-img convert` by default writes with `cache=unsafe` and never flushes "
        "its output; `qcowx import --no-sync` does the same (no fdatasync: the kernel writes "
        "the pages back later) — the target row. `qcowx import` by default makes its output "
        "durable before it returns (writeback started as it copies, one fdatasync, then the "
        "rename), as `qemu-img convert -t writeback` does (it flushes at the end); that pair "
        "waits for the disk to write 520 and 256 MiB, and is shown for information. Round 1 "
        "checks both imports with `qemu-img check` and `qemu-img compare` against the "
        "chain.\n\n" +
        table(["program", "seconds", "output MiB", "durable on return", "convert / import"],
              [["qcowx import --no-sync", fmt(ns_s, 3), size_of("qcowx-ns"), "no",
                fmt(q_s / ns_s)],
               ["qemu-img convert", fmt(q_s, 3), size_of("qemu"), "no", "-"],
               ["qcowx import", fmt(x_s, 3), size_of("qcowx"), "yes", fmt(w_s / x_s)],
               ["qemu-img convert -t writeback", fmt(w_s, 3), size_of("qemu-wb"), "yes",
                "-"]])))


def case_send(ctx):
    """(i) incremental send of a 1% change vs qemu-img convert of the whole image."""
    size = 1 * GIB if ctx.quick else 16 * GIB
    # The whole disk holds data: what `qemu-img convert` copies between hosts is the
    # image, whatever changed.
    data = 64 * MIB if ctx.quick else size
    img = ctx.work / "send.qcow2"
    clusters = size // CLUSTER
    changed = clusters // 100
    rnd = ctx.work / "send-random.bin"
    rnd.write_bytes(os.urandom(CLUSTER))
    log(f"send: {size // GIB} GiB image, {data // MIB} MiB of data, 1% = {changed} clusters")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img, size])
    # qemu-io takes at most about 2 GiB a request: write the data 1 GiB at a time.
    fill = []
    for off in range(size - data, size, GIB):
        fill += ["-c", f"write -q -P 0x5a {off} {min(GIB, size - off)}"]
    run(["qemu-io", "-f", "qcow2", *fill, img])
    run(ctx.qcowx("snapshot", "-q", img, "a"))
    # Every 100th cluster of the disk, whole, with incompressible data (one cluster per
    # record: nothing for zstd to find across clusters).
    spread = []
    for c in range(0, clusters, 100):
        spread += ["-c", f"write -q -s {rnd} {c * CLUSTER} {CLUSTER}"]
    for i in range(0, len(spread), 2000):
        run(["qemu-io", "-f", "qcow2", *spread[i:i + 2000], img])
    run(ctx.qcowx("snapshot", "-q", img, "b"))
    changed_bytes = len(spread) // 2 * CLUSTER
    stream = ctx.work / "send.stream"
    out = ctx.work / "send-convert.qcow2"
    # Two kinds, each compared with its like: neither waiting for the disk (`send
    # --no-sync`, convert's default), and both making the output durable (`send`'s
    # default, `convert -t writeback`).
    cmds = {"qcowx": ctx.qcowx("send", "-q", "--no-sync", "--from", "a", "-o", stream, img, "b"),
            "qemu": ["qemu-img", "convert", "-O", "qcow2", "-l", "snapshot.name=b", img, out],
            "qcowx-sync": ctx.qcowx("send", "-q", "--from", "a", "-o", stream, img, "b"),
            "qemu-wb": ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", "-l",
                        "snapshot.name=b", img, out]}
    t = {p: [] for p in cmds}
    for r in range(ctx.rounds):
        for prog in orders(r, list(cmds)):
            for f in (stream, out):
                if f.exists():
                    f.unlink()
            os.sync()
            s = wall(cmds[prog])
            t[prog].append(s)
            log(f"send round {r + 1}: {prog:10} {s:.3f} s")
    # The stream must carry the change: received, it reads as snapshot b.
    recv = ctx.work / "send-recv.qcow2"
    for f in (recv, stream):
        if f.exists():
            f.unlink()
    run(ctx.qcowx("send", "-q", "-o", stream, img, "a"))
    run(ctx.qcowx("receive", "-q", "-i", stream, recv))
    run(ctx.qcowx("send", "-q", "--from", "a", "-o", stream, img, "b"))
    stream_bytes = stream.stat().st_size
    run(ctx.qcowx("receive", "-q", "-i", stream, recv))
    run(["qemu-img", "check", "-q", recv])
    x_s, q_s = median(t["qcowx"]), median(t["qemu"])
    xs_s, qw_s = median(t["qcowx-sync"]), median(t["qemu-wb"])
    ratio = q_s / x_s
    size_ratio = stream_bytes / changed_bytes
    ctx.row("send", f"incremental stream of a 1% change, {size // GIB} GiB image, vs qemu-img "
            "convert of the whole snapshot, neither waiting for the disk (`send --no-sync`, "
            "convert's default)", fmt_time(x_s), fmt_time(q_s), ratio,
            # The target is for a disk whose every cluster holds data, which a quick
            # run's image (64 MiB of data in 1 GiB) is not: there the row informs.
            "-" if ctx.quick else "≥ 50", None if ctx.quick else ratio >= 50,
            f"stream {fmt(size_ratio, 3)}× the changed data")
    for f in (recv, stream, out):
        if f.exists():
            f.unlink()
    ctx.section("(i) Send of an incremental stream", (
        f"A {size // GIB} GiB image (64 KiB clusters) whose "
        + ("every cluster holds" if data == size else f"last {data // MIB} MiB hold")
        + f" data (`qemu-io`, one byte pattern); snapshot `a`; every 100th cluster of the disk rewritten whole with "
        f"incompressible data ({changed_bytes // MIB} MiB, 1%); snapshot `b`. `qcowx send --from a "
        "FILE b -o OUT` writes the stream of what changed (the tree diff, then one zstd record per "
        "run of changed clusters); `qemu-img convert -O qcow2 -l snapshot.name=b` copies the whole "
        "snapshot (what a copy between hosts costs without streams). Both come in two kinds, "
        "each compared with its like: `qemu-img convert` by default never flushes its output, "
        "and `send --no-sync` does not either (the target row); `send` by default makes its "
        "output durable before it returns (fdatasync), as `convert -t writeback` does (shown "
        "for information). Wall times, output removed and `sync` run before each run, order "
        "alternating. The stream is then received into a new image, which `qemu-img check` "
        "must pass.\n\n" +
        table(["program", "seconds", "output bytes / changed bytes", "durable on return",
               "convert / send"],
              [["qcowx send --no-sync --from a", fmt(x_s, 3), fmt(size_ratio, 3), "no",
                fmt(ratio)],
               ["qemu-img convert (whole snapshot)", fmt(q_s, 3), "-", "no", "-"],
               ["qcowx send --from a", fmt(xs_s, 3), fmt(size_ratio, 3), "yes",
                fmt(qw_s / xs_s)],
               ["qemu-img convert -t writeback", fmt(qw_s, 3), "-", "yes", "-"]])))


def case_large(ctx):
    """Whole-image commands on large images: map and check of a 1 TiB image with an L2
    table per 512 MiB, convert of a 2 GiB image full of data and compare of it with its
    copy."""
    size, dense_size = (64 * GIB, 64 * MIB) if ctx.quick else (1 << 40, 2 * GIB)
    step = 512 * MIB
    tables = size // step
    label = f"{size >> 40} TiB" if size >= (1 << 40) else f"{size // GIB} GiB"
    sparse = ctx.work / "large.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", sparse, str(size)])
    run(["qemu-io", "-f", "qcow2", sparse],
        input="".join(f"write -P {i % 250 + 1} {i * step} 4k\n" for i in range(tables)))
    dense = ctx.work / "dense.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", dense, str(dense_size)])
    chunk = min(dense_size, 256 * MIB)
    run(["qemu-io", "-f", "qcow2", dense],
        input="".join(f"write -P 0x5a {o} {chunk}\n" for o in range(0, dense_size, chunk)))
    twin = ctx.work / "dense-copy.qcow2"
    fresh(dense, twin)
    os.sync()
    if run(ctx.qcowx("map", sparse)) != run(["qemu-img", "map", sparse]):
        raise Broken("qcowx map and qemu-img map print different maps")
    outs = {p: ctx.work / f"large-{i}.qcow2" for i, p in enumerate(
        ["qcowx convert -t unsafe", "qemu-img convert", "qcowx convert",
         "qemu-img convert -t writeback"])}
    cmds = {
        "qcowx map": ctx.qcowx("map", sparse), "qemu-img map": ["qemu-img", "map", sparse],
        "qcowx check": ctx.qcowx("check", sparse),
        "qemu-img check": ["qemu-img", "check", "-q", sparse],
        "qcowx convert -t unsafe": ctx.qcowx("convert", "-t", "unsafe", "-O", "qcow2", dense,
                                             outs["qcowx convert -t unsafe"]),
        "qemu-img convert": ["qemu-img", "convert", "-O", "qcow2", dense,
                             outs["qemu-img convert"]],
        "qcowx convert": ctx.qcowx("convert", "-O", "qcow2", dense, outs["qcowx convert"]),
        "qemu-img convert -t writeback": ["qemu-img", "convert", "-t", "writeback", "-O",
                                          "qcow2", dense, outs["qemu-img convert -t writeback"]],
        "qcowx compare": ctx.qcowx("compare", dense, twin),
        "qemu-img compare": ["qemu-img", "compare", dense, twin],
    }
    t = {p: [] for p in cmds}
    for r in range(ctx.rounds):
        for prog in orders(r, list(cmds)):
            out = outs.get(prog)
            if out is not None and out.exists():
                out.unlink()
            os.sync()
            t[prog].append(wall(cmds[prog]))
            log(f"large round {r + 1}: {prog:30} {fmt_time(t[prog][-1])}")
            if out is not None and prog.startswith("qcowx") and r == 0:
                run(["qemu-img", "check", "-q", out])
                if subprocess.run(["qemu-img", "compare", "-q", out, dense]).returncode != 0:
                    raise Broken(f"{prog}: the output differs from its source")
    for out in outs.values():
        if out.exists():
            out.unlink()
    sparse.unlink()
    dense.unlink()
    twin.unlink()
    med = {p: median(v) for p, v in t.items()}
    pairs = [("map", "qcowx map", "qemu-img map", f"{label}, {tables} L2 tables"),
             ("check", "qcowx check", "qemu-img check", f"{label}, {tables} L2 tables"),
             ("convert", "qcowx convert -t unsafe", "qemu-img convert",
              f"{dense_size // MIB} MiB of data to qcow2, neither flushing"),
             ("convert", "qcowx convert", "qemu-img convert -t writeback",
              f"{dense_size // MIB} MiB of data to qcow2, both durable"),
             ("compare", "qcowx compare", "qemu-img compare",
              f"{dense_size // MIB} MiB of data against its copy (identical)")]
    for what, x, q, about in pairs:
        ctx.row("large", f"`{x}` vs `{q}`, {about}", fmt_time(med[x]), fmt_time(med[q]),
                med[q] / med[x], "≥ 1 (no slower)", med[x] <= med[q])
    ctx.section("Whole-image commands on large images", (
        f"A {label} image (`qemu-img create`, 64 KiB clusters) with one 4 KiB `qemu-io` write "
        f"every 512 MiB, so {tables} L2 tables each map one cluster: `map` and `check` walk "
        f"every entry. A {dense_size // MIB} MiB image written whole by `qemu-io`, converted "
        "to qcow2 (`qemu-img convert` by default neither flushes, nor does `qcowx convert -t "
        "unsafe`; `qcowx convert` and `-t writeback` make the output durable), and compared "
        "with a `cp` copy of itself. Wall times, "
        f"{ctx.rounds} round(s), order alternating, `sync` before each run, medians; "
        "qcowx's maps equal qemu-img's, its outputs check clean and compare equal.\n\n" +
        table(["program", "seconds"], [[p, fmt(med[p], 3)] for p in cmds])))
