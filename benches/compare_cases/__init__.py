"""The code of benches/compare, which runs `cli.main()`.

harness      constants, Broken, run/log helpers, medians, formats, Ctx, table
svg          SVG line plots
report       the machine description, RESULTS.md and plots/
fixtures     the shared images (fx_*), made once per run
local_io     cases io, reads, cow, subcluster (qcowx-bench / qemu-img bench)
snapshots    cases snapshots, gc, diff
nbd          cases nbd, disk (fio's nbd engine)
serve        case serve
whole_image  cases scan, import, send, large
cli          the command line, the CASES registry, the build, main()
"""
