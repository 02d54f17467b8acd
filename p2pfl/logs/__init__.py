"""Reading the gossip event logs: ``p2pfl logs`` and the harness's live progress.

``read`` finds, parses and merges logs (and tails them), ``summary`` totals them per peer,
``trace`` renders one round's messages, ``plot`` draws a PNG, ``command`` is the CLI.
"""

from __future__ import annotations

from p2pfl.logs.read import Event, LogError, Logs, Problem, Tail, find_logs, merge, read_logs
from p2pfl.logs.summary import PeerSummary, format_summary, summarize, summary_json
from p2pfl.logs.trace import TraceEntry, format_event, format_trace, trace_round

__all__ = [
    "Event",
    "LogError",
    "Logs",
    "PeerSummary",
    "Problem",
    "Tail",
    "TraceEntry",
    "find_logs",
    "format_event",
    "format_summary",
    "format_trace",
    "merge",
    "read_logs",
    "summarize",
    "summary_json",
    "trace_round",
]
