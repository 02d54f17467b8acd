"""The asyncio shell: the node, its network links, the event log, worker threads, the state
directory (events, checkpoints, ``secagg.log``), the status socket and metrics. The
protocol's decisions live in the pure packages; what stays here is about resources: which
job runs on which thread, when a file is synced, when a link is closed."""
