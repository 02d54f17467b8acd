"""The wire, pure: the Noise IK handshake, the record channel, message encoding with its
limits, parameter streams, the unauthenticated-connection budget, who is admitted. One
exception: ``keys`` also reads and writes the private-key files (``p2pfl keygen``)."""
