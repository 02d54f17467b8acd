"""p2pfl: peer-to-peer federated learning with encrypted gossip averaging."""

__version__ = "0.1.0"
