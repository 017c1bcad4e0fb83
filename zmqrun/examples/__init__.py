"""Example job scripts bundled with zmqrun (used by ``zmqrun demo``)."""
