"""The pure core of a round: who the neighbours are, how models combine, when a round
may end, differential privacy. No I/O, no event loop, no clock or randomness of its own."""
