"""chat.v1: messages (chat_pb2) and stubs (chat_pb2_grpc), generated at build time; never edit or commit them."""
