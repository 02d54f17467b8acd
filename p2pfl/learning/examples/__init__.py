"""Shipped example models (``torch``: ``p2pfl.learning.examples.torch_models``).

Importing this package imports nothing heavy: each example module imports its framework.
"""
