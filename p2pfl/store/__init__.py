"""Files a node writes and reads: checkpoints, ``.npz`` reading and writing, the export."""
