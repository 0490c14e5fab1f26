"""
mIoU against the number of labelled frames, one line per backbone, from a tools/real_data.py results.json:
mean over seeds with a bar of +- one standard deviation, one panel per mode (fine-tune, linear probe).
Writes an SVG with no plotting package (the project's runtime needs only torch, numpy, tqdm and pillow).

    python tools/plot_budgets.py runs/real/results.json docs/udder_budgets.svg
"""
import argparse
import json
import math
import statistics
from xml.sax.saxutils import escape

COLOURS = ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
MODES = {"finetune": "fine-tune (LL-FPN + UperNet)", "linear": "linear probe"}
W, H, LEFT, RIGHT, TOP, BOTTOM = 420, 320, 56, 16, 34, 44  # one panel, in px


def series(results):
    """{mode: {row: [(frames, mean, std, n)]}} from results.json's 'runs' ('row/mode/b<budget>': [mIoU per seed])."""
    frames = {int(b): n for b, n in results["budgets"].items()}
    out = {}
    for key, values in results["runs"].items():
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].startswith("b"):
            continue  # runs without a budget (one fixed label set): nothing to plot against
        row, mode, budget = parts[0], parts[1], int(parts[2][1:])
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.setdefault(mode, {}).setdefault(row, []).append((frames[budget], statistics.mean(values), std, len(values)))
    return {m: {r: sorted(p) for r, p in rows.items()} for m, rows in out.items()}


def panel(x0, title, rows, labels, xs, lo, hi):
    """SVG elements of one panel at horizontal offset x0: log-scaled frames on x, mIoU on y."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    lx = [math.log(x) for x in xs]
    span = (max(lx) - min(lx)) or 1.0
    X = lambda f: x0 + LEFT + 0.08 * pw + 0.84 * pw * (math.log(f) - min(lx)) / span
    Y = lambda v: TOP + ph * (hi - v) / (hi - lo)
    e = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
         f'<rect x="{x0 + LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    step = 5 if hi - lo > 12 else 2 if hi - lo > 5 else 1
    for v in range(math.ceil(lo / step) * step, int(hi) + 1, step):
        e.append(f'<line x1="{x0 + LEFT}" x2="{x0 + LEFT + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>')
        e.append(f'<text x="{x0 + LEFT - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="11">{v}</text>')
    for f in xs:
        e.append(f'<text x="{X(f):.1f}" y="{TOP + ph + 16}" text-anchor="middle" font-size="11">{f}</text>')
    e.append(f'<text x="{x0 + LEFT + pw / 2}" y="{H - 8}" text-anchor="middle" font-size="11">labelled frames</text>')
    for k, (row, pts) in enumerate(rows.items()):
        c, dx = COLOURS[k % len(COLOURS)], (k - (len(rows) - 1) / 2) * 4  # small offsets keep the bars apart
        path = " ".join(f"{X(f) + dx:.1f},{Y(m):.1f}" for f, m, _, _ in pts)
        e.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.6"/>')
        for f, m, s, n in pts:
            x = X(f) + dx
            e.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(m - s):.1f}" y2="{Y(m + s):.1f}" stroke="{c}"/>')
            e.append(f'<circle cx="{x:.1f}" cy="{Y(m):.1f}" r="{3 if n > 1 else 2}" fill="{c}"><title>'
                     f'{escape(labels.get(row, row))}: {m:.1f} +- {s:.1f} ({n} seed{"s" if n > 1 else ""})</title></circle>')
    return e


def svg(results):
    data = series(results)
    modes = [m for m in MODES if m in data]
    if not modes:
        raise SystemExit("results.json has no runs at a label budget ('row/mode/b<budget>' keys)")
    labels = results.get("labels", {})
    rows = list(dict.fromkeys(r for m in modes for r in data[m]))
    values = [v for m in modes for pts in data[m].values() for _, mean, s, _ in pts for v in (mean - s, mean + s)]
    lo, hi = math.floor(min(values) - 1), math.ceil(max(values) + 1)
    xs = sorted({f for m in modes for pts in data[m].values() for f, *_ in pts})
    legend_h = 18 * len(rows) + 10
    e = []
    for i, m in enumerate(modes):
        e += panel(i * W, MODES[m], data[m], labels, xs, lo, hi)
    e.append(f'<text x="14" y="{TOP + (H - TOP - BOTTOM) / 2}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 14 {TOP + (H - TOP - BOTTOM) / 2})">mIoU (%)</text>')
    for k, row in enumerate(rows):
        y = H + 14 + 18 * k
        e.append(f'<line x1="{LEFT}" x2="{LEFT + 22}" y1="{y}" y2="{y}" stroke="{COLOURS[k % len(COLOURS)]}" '
                 f'stroke-width="2"/>')
        e.append(f'<text x="{LEFT + 30}" y="{y + 4}" font-size="11">{escape(labels.get(row, row))}</text>')
    width, height = W * len(modes), H + legend_h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(e) + "\n</svg>\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json written by tools/real_data.py")
    p.add_argument("out", help="the SVG file to write")
    a = p.parse_args(argv)
    with open(a.out, "w") as f:
        f.write(svg(json.load(open(a.results))))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
