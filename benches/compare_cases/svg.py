"""SVG line plots for benches/compare (stdlib only)."""




COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _ticks(lo, hi, log_base):
    import math
    if log_base:
        a = math.floor(math.log(lo, log_base) + 1e-9)
        b = math.ceil(math.log(hi, log_base) - 1e-9)
        return [log_base ** i for i in range(a, b + 1)], log_base ** a, log_base ** b
    span = hi - lo if hi > lo else 1.0
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [start]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks, ticks[0], ticks[-1]


def _tick_label(v):
    if v >= 1000 and v == int(v):
        return f"{int(v):,}"
    if v == int(v):
        return str(int(v))
    return f"{v:g}"


def svg_plot(title, xlabel, ylabel, series, logx=None, logy=None, note=None):
    """A line plot. series: [(name, [(x, y), ...])]; logx/logy: None or a log base."""
    import math
    w, h = 760, 420
    left, right, top, bottom = 80, 250, 46, 58
    pts = [(x, y) for _, s in series for x, y in s if y == y and y is not None]
    if not pts:
        return None
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    xt, x0, x1 = _ticks(min(xs), max(xs), logx)
    ylo = min(ys) if logy else 0.0
    yt, y0, y1 = _ticks(max(ylo, 1e-9) if logy else ylo, max(ys), logy)

    def tx(x):
        if logx:
            f = (math.log(x) - math.log(x0)) / ((math.log(x1) - math.log(x0)) or 1)
        else:
            f = (x - x0) / ((x1 - x0) or 1)
        return left + f * (w - left - right)

    def ty(y):
        if logy:
            f = (math.log(y) - math.log(y0)) / ((math.log(y1) - math.log(y0)) or 1)
        else:
            f = (y - y0) / ((y1 - y0) or 1)
        return h - bottom - f * (h - top - bottom)

    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{(left + w - right) / 2}" y="24" text-anchor="middle" font-size="15" '
         f'font-weight="bold">{esc(title)}</text>']
    for v in xt:
        x = tx(v)
        o.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#ddd"/>')
        o.append(f'<text x="{x:.1f}" y="{h - bottom + 16}" text-anchor="middle">{_tick_label(v)}</text>')
    for v in yt:
        y = ty(v)
        o.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(v)}</text>')
    o.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
             f'fill="none" stroke="#333"/>')
    o.append(f'<text x="{(left + w - right) / 2}" y="{h - 16}" text-anchor="middle">{esc(xlabel)}</text>')
    o.append(f'<text transform="translate(18,{(top + h - bottom) / 2}) rotate(-90)" '
             f'text-anchor="middle">{esc(ylabel)}</text>')
    for i, (name, s) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        s = sorted((x, y) for x, y in s if y == y and y is not None)
        if not s:
            continue
        path = " ".join(f"{tx(x):.1f},{ty(y):.1f}" for x, y in s)
        o.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in s:
            o.append(f'<circle cx="{tx(x):.1f}" cy="{ty(y):.1f}" r="3.5" fill="{c}"/>')
        ly = top + 10 + i * 20
        o.append(f'<line x1="{w - right + 14}" y1="{ly}" x2="{w - right + 34}" y2="{ly}" '
                 f'stroke="{c}" stroke-width="2"/>')
        o.append(f'<text x="{w - right + 40}" y="{ly + 4}">{esc(name)}</text>')
    if note:
        o.append(f'<text x="{w - right + 14}" y="{h - bottom}" font-size="10" fill="#555">'
                 f'{esc(note)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"
