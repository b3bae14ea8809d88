"""The chat service's public contract as Python code: `chat.v1` is generated from proto/chat/v1/chat.proto."""
