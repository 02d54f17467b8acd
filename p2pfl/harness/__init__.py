"""Local multi-peer harness: datasets, data partitions and runs of several peers on one host."""
