"""The serve case (issue 16): qcowx-nbd and qemu-nbd starting, writing and stopping
on a large image with many snapshots."""

import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from .harness import (Broken, CLUSTER, GIB, KIB, fmt, fmt_time, fresh, log, median, orders,
                      proc_status_kib, run, table, wall)
from .fixtures import fx_serve_image


SERVE_READY_LINE = "  nbdinfo --list"


def connects(path):
    """Whether something accepts connections on the Unix socket at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def has_clean_stamp(img):
    """Whether the image's header carries qcowx's clean-close stamp (extension
    "qcxs"), which lets a writable open skip the metadata scan."""
    with open(img, "rb") as f:
        head = f.read(CLUSTER)
    if int.from_bytes(head[4:8], "big") < 3:
        return False
    at = int.from_bytes(head[100:104], "big")
    while at + 8 <= len(head):
        kind, n = int.from_bytes(head[at:at + 4], "big"), int.from_bytes(head[at + 4:at + 8], "big")
        if kind == 0:
            return False
        if kind == 0x71637873:
            return True
        at += 8 + (n + 7) // 8 * 8
    return False


def serve_once(ctx, srv, img, sock, offsets, errlog):
    """One server run on `img`: start until ready, the writes, then SIGTERM until it
    exits. Returns start, writes and stop times (s), VmHWM before SIGTERM and the
    highest VmHWM seen until it exited (polled every millisecond), both in KiB.
    (ru_maxrss would count the forked Python process before the exec.)"""
    if sock.exists():
        sock.unlink()
    if srv == "qcowx":
        cmd = [ctx.bins["qcowx-nbd"], "-t", "-k", sock, img]
        uri = f"nbd+unix:///default?socket={sock}"
    else:
        cmd = ["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", img]
        uri = f"nbd+unix:///?socket={sock}"
    with open(errlog, "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                             stderr=err, text=True)
    ready = []

    def drain():
        # Reads stdout to the end (the server never blocks on it), noting when the
        # banner's last line, the nbdinfo hint, came out.
        for line in p.stdout:
            if not ready and line.startswith(SERVE_READY_LINE):
                ready.append(time.perf_counter())

    threading.Thread(target=drain, daemon=True).start()
    reaped = False
    try:
        deadline = time.monotonic() + 300
        if srv == "qcowx":
            while not ready:
                if p.poll() is not None:
                    raise Broken(f"qcowx-nbd exited with {p.returncode} before its banner was "
                                 f"out: {Path(errlog).read_text().strip()[-2000:]}")
                if time.monotonic() > deadline:
                    raise Broken("qcowx-nbd printed no banner in 300 s")
                time.sleep(0.001)
            start = ready[0] - t0
        else:
            while not connects(sock):
                if p.poll() is not None:
                    raise Broken(f"qemu-nbd exited with {p.returncode}: "
                                 f"{Path(errlog).read_text().strip()[-2000:]}")
                if time.monotonic() > deadline:
                    raise Broken(f"qemu-nbd does not accept connections on {sock} after 300 s")
                time.sleep(0.001)
            start = time.perf_counter() - t0
        cmds = []
        for off in offsets:
            cmds += ["-c", f"write -q -P 1 {off} 4k"]
        t1 = time.perf_counter()
        run(["qemu-io", "-f", "raw", uri, *cmds])
        writes = time.perf_counter() - t1
        hwm = proc_status_kib(p.pid, "VmHWM")
        if hwm is None:
            raise Broken(f"{srv}-nbd exited before SIGTERM")
        last = [hwm]
        done = threading.Event()

        def watch():
            while not done.is_set():
                v = proc_status_kib(p.pid, "VmHWM")
                if v is None:
                    return
                # The kernel's VmHWM is max(recorded peak, current RSS), and the
                # peak is recorded lazily: a later read can be lower. Keep the highest.
                last[0] = max(last[0], v)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t2 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        try:
            _, status = os.waitpid(p.pid, 0)
        except ChildProcessError:
            raise Broken(f"{srv} server vanished")
        stop = time.perf_counter() - t2
        reaped = True
        done.set()
        watcher.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise Broken(f"{srv}-nbd exited with {p.returncode} after SIGTERM: "
                         f"{Path(errlog).read_text().strip()[-2000:]}")
        return start, writes, stop, hwm, last[0]
    finally:
        if not reaped and p.poll() is None:
            p.kill()
            p.wait()


def case_serve(ctx):
    """Issue 16: serving a large, fully allocated image with many snapshots: how long
    qcowx-nbd takes to start and stop, its memory, and one `qcowx io` write."""
    big, small = (4 * GIB, 1 * GIB) if ctx.quick else (1 << 40, 64 * GIB)
    nsnap = 20 if ctx.quick else 1000
    nwrites = 200 if ctx.quick else 1000
    io_n = 1 if ctx.quick else max(ctx.rounds, 5)
    label = lambda size: f"{size // GIB} GiB" if size < (1 << 40) else f"{size >> 40} TiB"
    sock = ctx.work / "serve.sock"
    errlog = ctx.work / "serve.err"
    res = {}
    said = {}
    stamped = {}
    checked = set()
    for size in (big, small):
        img = fx_serve_image(ctx, size, nsnap)
        stamped[size] = has_clean_stamp(img)
        rng = random.Random(16)
        offsets = rng.sample(range(size // 4096), nwrites)
        offsets = [o * 4096 for o in offsets]
        copies = {"qcowx": ctx.work / "serve-qcowx.qcow2", "qemu": ctx.work / "serve-qemu.qcow2"}
        for r in range(ctx.rounds):
            for srv in orders(r, ["qemu", "qcowx"]):
                fresh(img, copies[srv])
                out = serve_once(ctx, srv, copies[srv], sock, offsets, errlog)
                res.setdefault((size, srv), []).append(out)
                if srv == "qcowx":
                    said[size] = " ".join(Path(errlog).read_text().replace(
                        str(copies[srv]), "IMG").split()) or "nothing"
                log(f"serve {label(size)} round {r + 1}: {srv}-nbd ready {fmt_time(out[0])}, "
                    f"{nwrites} writes {fmt_time(out[1])}, stop {fmt_time(out[2])}, "
                    f"VmHWM {out[3] / KIB:.1f} MiB ({out[4] / KIB:.1f} MiB by the exit)")
            # Both copies got the same writes: qcowx's must hold them (QEMU's copy is not
            # read: it was written the same way) and pass `qemu-img check`. That check
            # counts every snapshot's references: 27 s at 64 GiB with 1,000 snapshots on
            # 2 cores, minutes at 1 TiB; so outside --quick it runs once, on the small image.
            if ctx.quick or (size == small and r == 0):
                run(["qemu-img", "check", "-q", copies["qcowx"]])
                checked.add(size)
            verify = []
            for off in offsets:
                verify += ["-c", f"read -q -P 1 {off} 4k"]
            run(["qemu-io", "-f", "qcow2", "-r", copies["qcowx"], *verify])
        for c in copies.values():
            c.unlink()
    # (d) one 4 KiB write by a command-line tool on the big image, fresh copy each time.
    img = fx_serve_image(ctx, big, nsnap)
    copy = ctx.work / "serve-io.qcow2"
    off = 1 * GIB
    io = {"qcowx": [], "qemu": []}
    for i in range(io_n):
        for prog in orders(i, ["qcowx", "qemu"]):
            fresh(img, copy)
            if prog == "qcowx":
                io[prog].append(wall(ctx.qcowx("io", "-q", "-c", f"write {off} 4k", copy)))
                # Both write qemu-io's default pattern, 0xcd.
                run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -q -P 0xcd {off} 4k", copy])
                if ctx.quick:
                    run(["qemu-img", "check", "-q", copy])
            else:
                io[prog].append(wall(["qemu-io", "-f", "qcow2", "-c", f"write {off} 4k", copy]))
    copy.unlink()
    log(f"serve: one 4 KiB write at 1 GiB: qcowx io {fmt_time(median(io['qcowx']))}, "
        f"qemu-io {fmt_time(median(io['qemu']))}")

    def med(size, srv, k):
        return median([v[k] for v in res[size, srv]])

    B = label(big)
    x, q = med(big, "qcowx", 0), med(big, "qemu", 0)
    ctx.row("serve", f"`qcowx-nbd` ready to serve, {B} allocated, {nsnap:,} snapshots",
            fmt_time(x), fmt_time(q), q / x, "≤ 2 × qemu-nbd's time (≥ 0.5)", q / x >= 0.5)
    x, q = med(big, "qcowx", 2), med(big, "qemu", 2)
    ctx.row("serve", f"`qcowx-nbd` stopped (SIGTERM to exit) after {nwrites:,} random 4 KiB writes, {B}",
            fmt_time(x), fmt_time(q), q / x, "≤ 2 × qemu-nbd's time (≥ 0.5)", q / x >= 0.5)
    x, q = med(big, "qcowx", 3), med(big, "qemu", 3)
    ctx.row("serve", f"`qcowx-nbd` peak RSS (VmHWM before SIGTERM), {B}",
            f"{x / KIB:.1f} MiB", f"{q / KIB:.1f} MiB", None, "≤ 64 MiB", x <= 64 * KIB)
    xs = med(small, "qcowx", 3)
    qs = med(small, "qemu", 3)
    growth = x / xs
    ctx.row("serve", f"`qcowx-nbd` peak RSS, {B} vs {label(small)} (ratio: {B} / {label(small)})",
            f"{x / KIB:.1f} vs {xs / KIB:.1f} MiB", f"{q / KIB:.1f} vs {qs / KIB:.1f} MiB (qemu-nbd)",
            growth, "≤ 1.2", growth <= 1.2)
    x, q = median(io["qcowx"]), median(io["qemu"])
    ctx.row("serve", f"one 4 KiB write, `qcowx io` vs `qemu-io` (wall time), {B}",
            fmt_time(x), fmt_time(q), q / x, "≤ 1.5 × qemu-io's time (≥ 0.67)", q / x >= 1 / 1.5)
    if all(stamped.values()):
        stamp_note = "present (a writable open may skip the scan)"
    else:
        missing = [label(z) for z, v in stamped.items() if not v]
        stamp_note = ("absent from the " + " and ".join(missing)
                      + (" images" if len(missing) > 1 else " image") + " after populate closed it, so qcowx's writable opens scan its "
                      "metadata (a stamp is added only when the header area stays within one "
                      "512-byte sector)")
    rows = []
    for size in (big, small):
        for srv in ("qcowx", "qemu"):
            rows.append([label(size), f"{srv}-nbd", fmt_time(med(size, srv, 0)),
                         fmt_time(med(size, srv, 1)), fmt_time(med(size, srv, 2)),
                         f"{med(size, srv, 3) / KIB:.1f}", f"{med(size, srv, 4) / KIB:.1f}"])
    ctx.section(f"Serving {B} with {nsnap:,} snapshots (issue 16)", (
        f"Images of {B} and {label(small)} with every cluster allocated (`qemu-img create -f qcow2 "
        "-o preallocation=metadata`, 64 KiB clusters: L2 entries and refcounts, no data, sparse), "
        f"then {nsnap:,} snapshots added by `qcowx-bench-tool populate`: each image was last "
        "closed by qcowx. Each run serves a fresh copy (`cp --sparse=always`, then `sync`; not "
        f"timed): `qcowx-nbd -t -k SOCK IMG` and `qemu-nbd -t -k SOCK -f qcow2 IMG`, {ctx.rounds} "
        "round(s), order alternating, medians. *Ready*: from process start until qcowx-nbd's "
        "banner is out (its last line, the `nbdinfo --list` hint, follows the listen) or until "
        f"qemu-nbd's socket accepts a connection (polled every millisecond). *Writes*: {nwrites:,} "
        "4 KiB writes at random 4 KiB-aligned offsets (the same for both, fixed seed) by one "
        "`qemu-io -f raw` over NBD, one at a time (every one lands under the snapshots: "
        "copy-on-write of its cluster and, the first time, its L2 table); qemu-io flushes "
        "when it closes the export (NBD_CMD_FLUSH, within the writes' time). *Stop*: from "
        "SIGTERM until the process has exited: what each server still does at shutdown after "
        "that flush (qcowx-nbd writes the refcount changes it recorded). *VmHWM*: the server's peak RSS read from `/proc/PID/status` just "
        "before SIGTERM (the target rows); *by the exit*: the highest VmHWM read until it had "
        "exited (polled every millisecond; it includes what the close needed). After each round "
        "every write is read back from qcowx's copy (`qemu-io -r`, `read -P 1`), and qcowx's "
        f"copies of the {' and '.join(label(z) for z in (big, small) if z in checked)} "
        f"image{'s' if len(checked) > 1 else ''} must pass `qemu-img check`" + ("" if ctx.quick else
        f" (once: that check counts every snapshot's references, minutes at {B} with "
        f"{nsnap:,} snapshots on this machine)") + ". "
        f"qcowx's clean-close stamp in the served image: {stamp_note}. "
        f"qcowx-nbd said on stderr at open ({B}): “{said.get(big, '')}”"
        + (f"; ({label(small)}): “{said.get(small, '')}”" if said.get(small) != said.get(big) else "")
        + ". The last row is one `qcowx io -q -c 'write 1G 4k' IMG` against `qemu-io -f qcow2 -c "
        f"'write 1G 4k' IMG` on a fresh copy of the {B} image each time (wall time: process start, "
        f"open, the write, close; {io_n} sample(s) each, alternating, medians; qcowx's write "
        "is read back).\n\n" +
        table(["image", "server", "ready", f"{nwrites:,} writes", "stop", "VmHWM MiB",
               "VmHWM by the exit, MiB"], rows) + "\n" +
        table(["one 4 KiB write at 1 GiB", "qcowx io", "qemu-io", "QEMU / qcowx"],
              [[B, fmt_time(x), fmt_time(q), fmt(q / x)]])))
