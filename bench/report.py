"""The bench's HTML report: one self-contained file, inline SVG charts, no scripts, no network."""

from __future__ import annotations

import html
import math
from typing import Any

COLORS = {"direct": "#777777", "nginx": "#2e8b57", "flintproxy": "#e4572e",
          "litellm": "#6a4c93"}
W, H = 720, 310
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 42, 44


def _e(s: object) -> str:
    return html.escape(str(s))


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _ticks(vmax: float, n: int = 5) -> list[float]:
    return [vmax * i / n for i in range(n + 1)]


def _tick_label(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:,.0f}k"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3f}".rstrip("0").rstrip(".") or "0"


def _frame(title: str, xlabel: str, ylabel: str, ymax: float) -> list[str]:
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{_e(title)}</text>']
    for v in _ticks(ymax):
        y = PAD_T + ph - ph * v / ymax
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#e5e5e5"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_tick_label(v)}</text>')
    out.append(f'<line x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{PAD_T + ph}" stroke="#333"/>')
    out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{PAD_T + ph}" y2="{PAD_T + ph}" '
               'stroke="#333"/>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{H - 8}" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text transform="translate(14,{PAD_T + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    return out


def _legend(names: list[str]) -> str:
    parts = []
    x = PAD_L + 8
    for n in names:
        parts.append(f'<rect x="{x}" y="{PAD_T - 17}" width="10" height="10" '
                     f'fill="{COLORS.get(n, "#333")}"/><text x="{x + 14}" y="{PAD_T - 8}">'
                     f'{_e(n)}</text>')
        x += 18 + 7 * len(n) + 10
    return "".join(parts)


def bar_chart(title: str, groups: list[str], series: list[str],
              values: dict[str, dict[str, float | None]], ylabel: str) -> str:
    vmax = _nice_max(max((v for g in values.values() for v in g.values() if v), default=1.0))
    out = _frame(title, "", ylabel, vmax)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    for gi, g in enumerate(groups):
        x0 = PAD_L + gi * gw + gw * 0.1
        for si, s in enumerate(series):
            v = values.get(g, {}).get(s)
            if v is None:
                continue
            h = ph * v / vmax
            x = x0 + si * bw
            out.append(f'<rect x="{x:.1f}" y="{PAD_T + ph - h:.1f}" width="{bw - 2:.1f}" '
                       f'height="{h:.1f}" fill="{COLORS.get(s, "#333")}"><title>{_e(s)}: '
                       f'{v:,.0f}</title></rect>')
            out.append(f'<text x="{x + bw / 2:.1f}" y="{PAD_T + ph - h - 3:.1f}" '
                       f'text-anchor="middle" font-size="10">{_tick_label(v)}</text>')
        out.append(f'<text x="{PAD_L + gi * gw + gw / 2:.1f}" y="{PAD_T + ph + 16}" '
                   f'text-anchor="middle">{_e(g)}</text>')
    out.append(_legend(series))
    out.append("</svg>")
    return "".join(out)


def line_chart(title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
               ylabel: str, xmax: float | None = None) -> str:
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    if not xs_all:
        return ""
    xmax = xmax or _nice_max(max(xs_all))
    ymax = _nice_max(max(ys_all) if ys_all else 1.0)
    out = _frame(title, xlabel, ylabel, ymax)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    for v in _ticks(xmax):
        x = PAD_L + pw * v / xmax
        out.append(f'<text x="{x:.1f}" y="{PAD_T + ph + 14}" text-anchor="middle">'
                   f'{_tick_label(v)}</text>')
    for name, (xs, ys) in series.items():
        pts = " ".join(f"{PAD_L + pw * min(x, xmax) / xmax:.1f},"
                       f"{PAD_T + ph - ph * y / ymax:.1f}" for x, y in zip(xs, ys, strict=True))
        out.append(f'<polyline fill="none" stroke="{COLORS.get(name, "#333")}" '
                   f'stroke-width="1.6" points="{pts}"/>')
    out.append(_legend(list(series)))
    out.append("</svg>")
    return "".join(out)


def _hist_from_samples(samples: list[float], edges: list[float]) -> list[float]:
    counts = [0] * (len(edges) - 1)
    if not samples:
        return [0.0] * len(counts)
    width = edges[1] - edges[0]
    for s in samples:
        i = min(len(counts) - 1, max(0, int((s - edges[0]) / width)))
        counts[i] += 1
    return [100.0 * c / len(samples) for c in counts]


def histogram(title: str, dists: dict[str, dict[str, Any]], xlabel: str, bins: int = 60) -> str:
    """Latency distributions as percent-per-bin lines; dists: name -> {"samples": ms}."""
    tops = []
    for d in dists.values():
        if d.get("samples"):
            s = sorted(d["samples"])
            tops.append(s[min(len(s) - 1, int(0.995 * len(s)))])
    if not tops:
        return ""
    xmax = _nice_max(max(tops) * 1.05)
    edges = [xmax * i / bins for i in range(bins + 1)]
    centers = [(edges[i] + edges[i + 1]) / 2 for i in range(bins)]
    series = {}
    for name, d in dists.items():
        if d.get("samples"):
            series[name] = (centers, _hist_from_samples(d["samples"], edges))
    return line_chart(title + " (last bin holds the tail)", series, xlabel, "% of requests",
                      xmax)


def _cell(fmt: str, v: Any) -> str:
    return "—" if v is None else fmt.format(v)


def _table_html(data: dict[str, Any]) -> str:
    targets = list(data["meta"]["targets"])
    both = {"flintproxy", "nginx"} <= set(targets)
    head = "".join(f"<th>{_e(data['meta']['targets'][t])}</th>" for t in targets)
    out = [f"<table><tr><th></th>{head}{'<th>flint ÷ nginx</th>' if both else ''}</tr>"]
    section = None
    for r in data["rows"]:
        if r["section"] != section:
            section = r["section"]
            out.append(f'<tr class="sec"><td colspan="{len(targets) + 2}">{_e(section)}</td></tr>')
        base = r["values"].get("direct")
        additive = r["fmt"].startswith("{:+")
        cells = []
        for t in targets:
            v = r["values"].get(t)
            txt = _cell(r["fmt"], v)
            if t != "direct" and v is not None and base and not additive:
                txt += f' <span class="r">({v / base:.2f}x)</span>'
            cells.append(f"<td>{txt}</td>")
        if both:
            f, n = r["values"].get("flintproxy"), r["values"].get("nginx")
            cells.append(f"<td>{'—' if f is None or not n or additive else f'{f / n:.2f}x'}</td>")
        out.append(f"<tr><td>{_e(r['label'].strip())}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


def _checks_html(data: dict[str, Any]) -> str:
    out = ["<table><tr><th>target</th><th>measured</th><th>goal</th><th>result</th></tr>"]
    for c in data["checks"]:
        res, cls = ("n/a", "na") if c["ok"] is None else (("PASS", "ok") if c["ok"]
                                                          else ("FAIL", "bad"))
        out.append(f"<tr><td>{_e(c['name'])}</td><td>{_e(c['shown'])}</td><td>{_e(c['goal'])}"
                   f'</td><td class="{cls}">{res}</td></tr>')
    out.append("</table>")
    return "".join(out)


def render(data: dict[str, Any], table_text: str, checks_text: str) -> str:
    meta = data["meta"]
    sc = data["scenarios"]
    targets = list(meta["targets"])
    charts = []
    tput = {"non-streaming": {t: sc.get("nonstream_sat", {}).get(t, {}).get("rps")
                              for t in targets},
            "streaming (20 chunks)": {t: sc.get("stream_sat", {}).get(t, {}).get("rps")
                                      for t in targets}}
    charts.append(bar_chart("Throughput at saturation", list(tput), targets, tput,
                            "requests/s"))
    mod = sc.get("nonstream_moderate", {})
    dists = {t: {"samples": mod[t]["latency_samples_ms"]}
             for t in targets if "latency_samples_ms" in mod.get(t, {})}
    if dists:
        rate = mod.get("direct", {}).get("rps", 0)
        charts.append(histogram(f"Non-streaming latency at ~{rate:,.0f} req/s", dists,
                                "latency, ms"))
    tt = sc.get("stream_ttfb", {})
    dists = {t: {"samples": tt[t].get("ttfb_samples_ms", [])} for t in targets if t in tt}
    if dists:
        charts.append(histogram("Streaming TTFB at a fixed rate", dists, "TTFB, ms"))
    for key in sorted((k for k in sc if k.startswith("slow_")), key=lambda k: int(k[5:])):
        s = sc[key]
        n = int(key[5:])
        dists = {t: {"samples": s[t].get("ttfb_samples_ms", [])} for t in targets if t in s}
        charts.append(histogram(f"TTFB, {n:,} concurrent slow streams", dists, "TTFB, ms"))
        open_series, rss_series = {}, {}
        for t in targets:
            r = s.get(t)
            if not r or not r.get("timeline"):
                continue
            t0 = r["t_first_start"]
            tl = r["timeline"]
            open_series[t] = ([x - t0 for x, _ in tl], [float(c) for _, c in tl])
            rt = r.get("rss_timeline") or []
            if t != "direct" and rt:
                base = r.get("base_rss_kib", 0)
                rss_series[t] = ([x - t0 for x, _ in rt], [(v - base) / 1024 for _, v in rt])
        if open_series:
            charts.append(line_chart(f"Open streams over time, {n:,} streams", open_series,
                                     "seconds", "open streams"))
        if rss_series:
            charts.append(line_chart(f"Gateway RSS growth, {n:,} streams", rss_series,
                                     "seconds", "MiB above baseline"))
    feats = data.get("features", {})
    notes = "".join(f"<li>{_e(n)}</li>" for n in meta.get("notes", []))
    if meta.get("noisy_runs"):
        notes += (f"<li>Figures that may not be the gateway's own: "
                  f"{_e('; '.join(meta['noisy_runs']))}; rerun before quoting those.</li>")
    plan = meta["plan"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flintproxy bench {_e(meta['time'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1.5em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.sec td {{ background: #f3f3f3; font-weight: bold; text-align: left; }}
.r {{ color: #777; }} .ok {{ color: #1a7f37; font-weight: bold; }}
.bad {{ color: #c62828; font-weight: bold; }} .na {{ color: #777; }}
pre {{ background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }}
svg {{ display: block; margin: 1em 0; }}
</style></head><body>
<h1>flintproxy bench</h1>
<p>{_e(meta['time'])} · {meta['cpus']} x {_e(meta['cpu'])} · kernel {_e(meta['kernel'])} ·
Python {_e(meta['python'])} · flintproxy {_e(meta['flintproxy'])} · nginx {_e(meta['nginx'])}
· {'full' if not meta['quick'] else 'quick'} run, {meta['runtime_s']:.0f} s</p>
<p>Gateway under test pinned to CPU {_e(meta['pinning']['gateway'])}; load generator
({'wrk' if meta['wrk'] else 'asyncio client: wrk missing'}) and upstreams
({_e(meta['upstream'])} canned responses; flintproxy mock-upstream for slow streams) on CPU
{_e(meta['pinning']['load generator'])}. Saturation: {plan['conns']} connections,
{plan['sat_s']:g} s per row. flintproxy: {_e(feats.get('auth'))}; /metrics HTTP
{_e(feats.get('metrics_status'))}; {_e(feats.get('usage_rows', '?'))} usage rows written.</p>
{f'<ul>{notes}</ul>' if notes else ''}
<h2>Figures (ratio to direct in parentheses)</h2>
{_table_html(data)}
<h2>Targets</h2>
{_checks_html(data)}
<h2>Charts</h2>
{''.join(charts)}
<h2>As printed</h2>
<pre>{_e(table_text)}

{_e(checks_text)}</pre>
</body></html>
"""
