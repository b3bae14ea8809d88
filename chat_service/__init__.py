"""A multi-room chat service over gRPC."""
