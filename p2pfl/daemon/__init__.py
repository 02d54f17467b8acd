"""The asyncio shell: the node, its network links, the event log, workers, persistence,
status and metrics. Decisions live in the pure packages; this moves bytes and runs timers."""
