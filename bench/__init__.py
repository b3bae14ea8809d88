"""The fan-out benchmark: a real `chat-server` subprocess driven by real gRPC clients in worker processes."""
