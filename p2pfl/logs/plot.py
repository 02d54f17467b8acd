"""A PNG of a run: accuracy, loss, round time and bytes sent, per round and per peer.

matplotlib is optional (peer processes never need it), so it is imported only here, and
drawn with the Agg canvas directly: no pyplot, no display, no global backend switch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError
from p2pfl.logs.read import Event

#: One series: peer -> round -> value.
Series = dict[str, dict[int, float]]


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def round_series(events: Iterable[Event]) -> dict[str, Series]:
    """The plotted numbers. A round logged twice (a restarted node) keeps its latest value;
    bytes sent are summed over the round's sends."""
    series: dict[str, Series] = {
        name: defaultdict(dict)
        for name in ("accuracy", "r2", "train_loss", "eval_loss", "round_s", "bytes_sent")
    }
    for e in events:
        if e.round is None:
            continue
        if e.type == "eval":
            for key, name in (("accuracy", "accuracy"), ("r2", "r2"), ("loss", "eval_loss")):
                value = _number(e.get(key))
                if value is not None:
                    series[name][e.node][e.round] = value
        elif e.type == "train":
            value = _number(e.get("loss"))
            if value is not None:
                series["train_loss"][e.node][e.round] = value
        elif e.type == "round_end":
            value = _number(e.get("duration_s"))
            if value is not None:
                series["round_s"][e.node][e.round] = value
        elif e.type == "send":
            value = _number(e.get("bytes"))
            if value is not None:
                per_round = series["bytes_sent"][e.node]
                per_round[e.round] = per_round.get(e.round, 0.0) + value
    return {name: dict(s) for name, s in series.items()}


def plot_logs(events: Iterable[Event], out: Path | str, title: str | None = None) -> Path:
    """Write the 2x2 panel PNG to ``out`` and return its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise P2PFLError("plotting needs matplotlib: pip install matplotlib") from exc
    data = round_series(events)
    peers = sorted({peer for s in data.values() for peer in s})
    if not peers:
        raise P2PFLError("nothing to plot: no eval, train, round_end or send events with a round")
    colours = {peer: f"C{i % 10}" for i, peer in enumerate(peers)}

    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    # A regression network logs R^2 where a classifier logs accuracy.
    score = "r2" if data["r2"] and not data["accuracy"] else "accuracy"
    panels: list[tuple[Any, str, list[tuple[str, str]], float]] = [
        (axes[0][0], "R^2 (eval)" if score == "r2" else "accuracy (eval)", [(score, "-")], 1.0),
        (
            axes[0][1],
            "loss (solid: train, dashed: eval)",
            [("train_loss", "-"), ("eval_loss", "--")],
            1.0,
        ),
        (axes[1][0], "round time (ms)", [("round_s", "-")], 1000.0),
        (axes[1][1], "bytes sent (KB)", [("bytes_sent", "-")], 1 / 1024),
    ]
    for ax, label, keys, scale in panels:
        drawn = False
        for key, style in keys:
            for peer in peers:
                points = sorted(data[key].get(peer, {}).items())
                if not points:
                    continue
                xs = [r for r, _ in points]
                ys = [v * scale for _, v in points]
                ax.plot(xs, ys, style, color=colours[peer], marker=".")
                drawn = True
        ax.set_title(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("round")
    handles = [Line2D([], [], color=colours[p], marker=".", label=p) for p in peers]
    fig.legend(handles=handles, loc="outside right upper", title="peer")
    if title:
        fig.suptitle(title)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
