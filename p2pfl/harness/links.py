"""What ``--link RATE[,DELAY[,LOSS]]`` and ``--host-link PEER=SPEC`` mean: each simulated
host's link to the rest of the network. Pure parsing, no namespaces (see ``hosts``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)$")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s)$")
#: Beyond this the link is not a network any more (and tc's own bounds are near).
MAX_RATE_BPS = 100 * 10**9
MAX_DELAY_S = 10.0


class LinkSpecError(ValueError):
    """A ``--link`` or ``--host-link`` argument is malformed."""


@dataclass(frozen=True)
class LinkSpec:
    """One host's link: ``rate_bps`` each way (None: as fast as the machine goes), one-way
    ``delay_s`` added to every byte in and out, and the chance ``loss`` that a packet in or
    out is dropped."""

    rate_bps: int | None = None
    delay_s: float = 0.0
    loss: float = 0.0

    @property
    def shaped(self) -> bool:
        return self.rate_bps is not None or self.delay_s > 0 or self.loss > 0

    def __str__(self) -> str:
        parts = [format_rate(self.rate_bps)]
        if self.delay_s or self.loss:
            parts.append(f"{self.delay_s * 1000:g}ms")
        if self.loss:
            parts.append(f"{self.loss:g}")
        return ",".join(parts)


def format_rate(rate_bps: int | None) -> str:
    if rate_bps is None:
        return "unlimited"
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if rate_bps >= factor and rate_bps % factor == 0:
            return f"{rate_bps // factor}{unit}"
    return f"{rate_bps}bit"


def parse_link(text: str) -> LinkSpec:
    """``RATE[,DELAY[,LOSS]]``: ``100mbit``, ``1gbit,20ms``, ``10mbit,50ms,0.01``; RATE may be
    ``unlimited``; LOSS is a fraction (0.01) or a percentage (1%)."""
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise LinkSpecError(f"{text!r}: expected RATE[,DELAY[,LOSS]], e.g. 100mbit,20ms,0.01")
    rate = _parse_rate(parts[0], text)
    delay = _parse_delay(parts[1], text) if len(parts) > 1 else 0.0
    loss = _parse_loss(parts[2], text) if len(parts) > 2 else 0.0
    return LinkSpec(rate, delay, loss)


def _parse_rate(part: str, text: str) -> int | None:
    if part.lower() in ("unlimited", "none"):
        return None
    match = _RATE.match(part.lower())
    if match is None:
        raise LinkSpecError(
            f"{text!r}: rate {part!r} is not like 100mbit (units bit, kbit, mbit, gbit; "
            "or unlimited)"
        )
    rate = round(float(match[1]) * _RATE_UNITS[match[2]])
    if not 1000 <= rate <= MAX_RATE_BPS:
        raise LinkSpecError(f"{text!r}: rate {part} is outside 1kbit..100gbit")
    return rate


def _parse_delay(part: str, text: str) -> float:
    match = _DELAY.match(part.lower())
    if match is None:
        raise LinkSpecError(f"{text!r}: delay {part!r} is not like 20ms or 0.5s")
    delay = float(match[1]) / (1000 if match[2] == "ms" else 1)
    if delay > MAX_DELAY_S:
        raise LinkSpecError(f"{text!r}: delay {part} is above {MAX_DELAY_S:g}s")
    return delay


def _parse_loss(part: str, text: str) -> float:
    try:
        loss = float(part[:-1]) / 100 if part.endswith("%") else float(part)
    except ValueError:
        raise LinkSpecError(f"{text!r}: loss {part!r} is not a fraction (0.01) or 1%") from None
    if not 0 <= loss < 1:
        raise LinkSpecError(f"{text!r}: loss {part} must be at least 0 and below 1")
    return loss


def host_links(
    peers: Iterable[str], default: LinkSpec, overrides: Iterable[str]
) -> dict[str, LinkSpec]:
    """Every peer's link: ``default``, except where ``--host-link PEER=SPEC`` says."""
    links = dict.fromkeys(peers, default)
    given: set[str] = set()
    for text in overrides:
        peer, sep, spec = text.partition("=")
        if not sep:
            raise LinkSpecError(f"--host-link {text!r}: expected PEER=RATE[,DELAY[,LOSS]]")
        if peer not in links:
            raise LinkSpecError(f"--host-link {text!r}: no peer {peer!r}")
        if peer in given:
            raise LinkSpecError(f"--host-link: {peer} is given twice")
        given.add(peer)
        links[peer] = parse_link(spec)
    return links


def describe_links(links: Mapping[str, LinkSpec]) -> str:
    """``100mbit,20ms on every host`` or ``100mbit on 7 hosts, p03 10mbit``."""
    counts: dict[LinkSpec, list[str]] = {}
    for peer, spec in links.items():
        counts.setdefault(spec, []).append(peer)
    common = max(counts, key=lambda s: len(counts[s]))
    if len(counts) == 1:
        return f"{common} on every host"
    others = ", ".join(
        f"{peer} {spec}" for spec, peers in counts.items() if spec != common for peer in peers
    )
    return f"{common} on {len(counts[common])} hosts, {others}"
