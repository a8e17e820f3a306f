"""The images the cases share, made once per run and kept in ctx.cache."""

import os
import shutil
import subprocess
import time

from .harness import Broken, CLUSTER, GIB, MIB, log, run


def qemu_io_layer_cmds(k, clusters):
    """Layer k writes pattern k+1 to the clusters c with c mod 128 in {k-1, k}: each
    layer rewrites half of what the previous one wrote, so every snapshot holds 1/128
    of the disk that no other root has."""
    cmds = []
    for b in range(0, clusters, 128):
        cmds += ["-c", f"write -q -P {k + 1} {(b + k - 1) * CLUSTER} {2 * CLUSTER}"]
    return cmds


def fx_base(ctx):
    """A qcow2 image (64 KiB clusters) prefilled by qemu-io."""
    if "base" in ctx.cache:
        return ctx.cache["base"]
    size = 32 * MIB if ctx.quick else 256 * MIB
    base = ctx.work / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", base, size])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0xa5 0 {size}", base])
    ctx.cache["base"] = (base, size)
    return base, size


def fx_layers(ctx):
    """The base plus L layers: a qcowx image with a snapshot before each layer (copies
    kept at the depths measured) and a QEMU backing chain of the same layers."""
    if "layers" in ctx.cache:
        return ctx.cache["layers"]
    base, size = fx_base(ctx)
    layers = 8 if ctx.quick else 64
    depths = [1, 8] if ctx.quick else [1, 2, 4, 8, 16, 32, 64]
    log(f"building a {layers}-snapshot qcowx image and a {layers}-deep QEMU chain ({size // MIB} MiB)")
    x = ctx.work / "x.qcow2"
    shutil.copy(base, x)
    chain = ctx.work / "chain"
    chain.mkdir()
    shutil.copy(base, chain / "l0.qcow2")
    xd = {}
    for k in range(1, layers + 1):
        cmds = qemu_io_layer_cmds(k, size // CLUSTER)
        run(ctx.qcowx("snapshot", "-q", x, f"s{k}"))
        run(ctx.qcowx("io", *cmds, x))
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             "-b", f"l{k - 1}.qcow2", "-F", "qcow2", chain / f"l{k}.qcow2"])
        run(["qemu-io", "-f", "qcow2", *cmds, chain / f"l{k}.qcow2"])
        if k in depths:
            xd[k] = ctx.work / f"x-depth{k}.qcow2"
            shutil.copy(x, xd[k])
    for k in (depths[0], depths[-1]):
        # Not a speed check: both sides must hold the same bytes.
        r = subprocess.run(["qemu-img", "compare", "-q", xd[k], chain / f"l{k}.qcow2"])
        if r.returncode != 0:
            raise Broken(f"the qcowx image and the QEMU chain differ at depth {k}")
    run(["qemu-img", "check", "-q", x])
    run(["sync"])
    ctx.cache["layers"] = (x, xd, chain, layers, depths, size)
    return ctx.cache["layers"]


def fx_snap_image(ctx):
    """An image with `size` allocated (qemu-img preallocation=metadata: L2 entries and
    refcounts, no data, sparse) and a snapshot `victim` that alone holds 64 MiB."""
    size = 1 * GIB if ctx.quick else 16 * GIB
    img = ctx.work / "snap.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={CLUSTER},preallocation=metadata", img, size])
    vlen = 8 * MIB if ctx.quick else 64 * MIB
    run(ctx.qcowx("io", "-c", f"write -q -P 0x5a {size // 2} {vlen}", img))
    run(ctx.qcowx("snapshot", "-q", img, "victim"))
    run(ctx.qcowx("io", "-c", f"write -q -P 0x6b {size // 2} {vlen}", img))
    return img, size


def gc_big_count(ctx):
    return 100 if ctx.quick else 1000


def fx_gc_big(ctx):
    if "gc_big" not in ctx.cache:
        img, _ = fx_snap_image(ctx)
        ctx.tool("populate", img, gc_big_count(ctx))
        ctx.cache["gc_big"] = img
    return ctx.cache["gc_big"]


def fx_disk(ctx):
    """A disk QEMU wrote whole (qemu-io), 64 KiB clusters: every cluster allocated."""
    if "disk" in ctx.cache:
        return ctx.cache["disk"]
    size = 128 * MIB if ctx.quick else 2 * GIB
    img = ctx.work / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", img, size])
    # qemu-io takes at most 2 GiB - 512 bytes per request.
    step = min(size, GIB)
    run(["qemu-io", "-f", "qcow2", *[a for o in range(0, size, step)
                                     for a in ("-c", f"write -q -P 0x5a {o} {step}")], img])
    ctx.cache["disk"] = (img, size)
    return ctx.cache["disk"]


def fx_serve_image(ctx, size, nsnap):
    """A `size` image with every cluster allocated (qemu-img preallocation=metadata:
    L2 entries and refcounts, no data, sparse) and `nsnap` snapshots added by
    `qcowx-bench-tool populate`, which opens and closes it as qcowx does: the image
    was last closed by qcowx."""
    key = ("serve", size, nsnap)
    if key in ctx.cache:
        return ctx.cache[key]
    img = ctx.work / f"serve-{size // GIB}g.qcow2"
    t0 = time.perf_counter()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={CLUSTER},preallocation=metadata", img, size])
    t1 = time.perf_counter()
    out = ctx.tool("populate", img, nsnap)
    run(["sync"])
    size_s = f"{size // GIB} GiB" if size < (1 << 40) else f"{size >> 40} TiB"
    log(f"serve: {size_s} allocated (qemu-img create {t1 - t0:.1f} s), {nsnap:,} snapshots "
        f"(populate {out['total_seconds']} s); {os.stat(img).st_blocks * 512 / MIB:.0f} MiB on disk")
    ctx.cache[key] = img
    return img
