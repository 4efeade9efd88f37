"""The run report: one self-contained HTML file (``report.html``) from a run's output folder.

It reads ``history.json`` and ``config.json`` and embeds everything (plots as PNG data URIs, no scripts, no
external files), so the file can be mailed or archived as is. Sections: central Dice per organ per round (plot
and table), per-round participation of each site with its loss and seconds plus failed or rejected updates,
the cross-site matrix (each site's own scores of the global model, mean ± sd with n), the config, the versions,
and any attention PNGs found under the run folder or beside it (``../attention``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedseg.common.errors import ConfigError
from fedseg.server.run.history import HISTORY_FILE, RoundRow, read_history

REPORT_FILE = "report.html"
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.bad{color:#b00020;font-weight:bold}img{max-width:100%}
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def dice_plot(rows: Sequence[RoundRow]) -> str:
    """PNG data URI of the central Dice per organ per round ('' when nothing was validated)."""
    organs = sorted({k for r in rows for k, v in r.dice.items() if v is not None and k != "dice_mean"})
    if not organs:
        return ""
    fig = Figure(figsize=(8, 3.5), dpi=100)
    ax = fig.subplots()
    for key in [*organs, "dice_mean"]:
        points = [(r.round, r.dice[key]) for r in rows if r.dice.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            if key == "dice_mean":
                ax.plot(xs, ys, marker="o", label="mean", color="black", linestyle="--")
            else:
                ax.plot(xs, ys, marker="o", label=key.removeprefix("dice_"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="central Dice", ylim=(0, 1), title="Central validation Dice per organ")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it covered the last rounds, where the curves end.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _figure_uri(fig)


def _figure_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def rounds_table(rows: Sequence[RoundRow]) -> str:
    """One row per round: seconds, Dice, failures/rejections, then loss (cases, seconds, DP-SGD ε) of every site."""
    sites = sorted({s.site for r in rows for s in r.sites})
    organs = sorted({k for r in rows for k in r.dice if k != "dice_mean"})
    head = "".join(f"<th>{_esc(o.removeprefix('dice_'))}</th>" for o in [*organs, "dice_mean"])
    private = any(s.epsilon is not None for r in rows for s in r.sites)
    what = "loss (cases, s, ε)" if private else "loss (cases, s)"
    head += "<th>failed / rejected</th>" + "".join(f"<th>{_esc(s)}<br>{what}</th>" for s in sites)
    lines = [f"<table><tr><th>round</th><th>seconds</th>{head}</tr>"]
    for row in rows:
        extra = row.model_dump()
        rejected = sum(len(v) if isinstance(v, list) else int(v) for k, v in extra.items() if "reject" in k and v)
        cells = [str(row.round), _num(row.seconds, 1)]
        cells += [_num(row.dice.get(o)) for o in [*organs, "dice_mean"]]
        flag = f"{row.failures} / {rejected}"
        cells.append(f"<span class='bad'>{flag}</span>" if row.failures or rejected else flag)
        by_site = {s.site: s for s in row.sites}
        for site in sites:
            s = by_site.get(site)
            if s is not None:
                eps = f", ε {s.epsilon:.2f} at δ {s.delta:g}" if s.epsilon is not None and s.delta is not None else ""
                cells.append(f"{s.loss:.3f} ({s.cases}, {s.seconds:.0f}{eps})")
            else:  # round 0 is the initial model: nobody trains
                cells.append("–" if row.round == 0 else "<span class='bad'>absent</span>")
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def cross_site_table(rows: Sequence[RoundRow]) -> str:
    """The latest cross-site matrix: sites × organs, Dice mean ± sd (n) and HD95 mean (mm)."""
    latest = next((r for r in reversed(rows) if r.cross_site), None)
    if latest is None:
        return "<p>No cross-site validation in this run (set <code>cross_site_every</code>).</p>"
    organs = sorted({o for site in latest.cross_site.values() for o in site})
    lines = [f"<p>After round {latest.round}: each site scored the global model on its own labelled cases.</p>"]
    lines.append("<table><tr><th class='l'>site</th>" + "".join(f"<th>{_esc(o)}</th>" for o in organs) + "</tr>")
    for site, scores in sorted(latest.cross_site.items()):
        cells = []
        for organ in organs:
            dice, hd = scores.get(organ, {}).get("dice", {}), scores.get(organ, {}).get("hd95", {})
            if not dice.get("n"):
                cells.append("not annotated / absent")
                continue
            sd = f" ± {dice['sd']:.3f}" if "sd" in dice else ""
            hd_text = f"<br>HD95 {hd['mean']:.1f} mm" if "mean" in hd else ""
            cells.append(f"{_num(dice.get('mean'))}{sd} (n={int(dice['n'])}){hd_text}")
        lines.append(f"<tr><td class='l'>{_esc(site)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def versions() -> dict[str, str]:
    """Versions of the packages that decide the results."""
    out = {"python": platform.python_version()}
    for name in ("fedseg", "torch", "flwr", "numpy", "SimpleITK"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _images(run_dir: Path) -> list[Path]:
    found = [*run_dir.glob("attention/*.png"), *run_dir.parent.glob("attention/*.png")]
    return sorted(set(found))[:6]


def render_report(run_dir: Path) -> str:
    """The report's HTML text for ``run_dir``.

    Raises:
        ConfigError: ``run_dir`` has no history.json (not a fedseg run folder, or no round finished yet).
    """
    if not (run_dir / HISTORY_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {HISTORY_FILE}; pass the output folder of a fed-server run")
    rows = read_history(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    plot = dice_plot(rows)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedseg run {_esc(run_dir.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>fedseg run report: {_esc(run_dir.name)}</h1>",
        f"<p>{len(rows)} rows (round 0 = initial model); written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>",
        "<h2>Central validation</h2>",
        f"<img alt='central Dice per organ per round' src='{plot}'>" if plot else "<p>No central validation.</p>",
        "<h2>Rounds: Dice, failures, and each site's loss (cases, seconds)</h2>",
        rounds_table(rows),
        "<h2>Cross-site validation</h2>",
        cross_site_table(rows),
    ]
    images = _images(run_dir)
    if images:
        parts.append("<h2>Attention</h2>")
        for image in images:
            uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            parts.append(f"<p>{_esc(image.name)}</p><img alt='{_esc(image.name)}' src='{uri}'>")
    parts += [
        "<h2>Versions</h2><table>",
        *(f"<tr><td class='l'>{_esc(k)}</td><td class='l'>{_esc(v)}</td></tr>" for k, v in versions().items()),
        "</table><h2>Config</h2>",
        f"<pre>{_esc(json.dumps(config, indent=2))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` and return its path (see :func:`render_report`)."""
    path = run_dir / REPORT_FILE
    path.write_text(render_report(run_dir), encoding="utf-8")
    return path
