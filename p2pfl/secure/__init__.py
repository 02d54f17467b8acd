"""Secure aggregation, pure: the ring arithmetic and masks (``arithmetic``), Shamir
sharing (``shamir``), one group's protocol for one round in both roles (``group``), and a
node's decisions across rounds and groups (``session``), which the daemon's
``secure_exchange`` feeds and pumps. No sockets, event loop, threads or files; randomness
comes from ``secrets`` unless a test passes a seeded source; ``session`` logs through
``logging`` as websockets' protocol objects do."""
