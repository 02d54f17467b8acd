"""The wire, pure: the Noise IK handshake, the record channel, message encoding with its
limits, parameter streams, the unauthenticated-connection budget, key files."""
