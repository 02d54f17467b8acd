"""Secure aggregation, pure: the ring arithmetic and masks, Shamir sharing, and one
group's protocol for one round (both roles). The daemon's ``secure_exchange`` pumps it."""
