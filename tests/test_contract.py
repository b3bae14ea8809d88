"""The proto as other languages' generators see it: every per-language option set, so protoc needs no flags."""

from __future__ import annotations

from chat.v1 import chat_pb2
from chat_service.server import ChatServer
from chat_service.service import ChatServicer, method_handlers


def test_the_proto_names_a_package_for_every_common_language() -> None:
    options = chat_pb2.DESCRIPTOR.GetOptions()
    assert options.go_package == "chatservice/gen/go/chat/v1;chatv1"
    assert (options.java_package, options.java_outer_classname, options.java_multiple_files) == (
        "chat.v1",
        "ChatProto",
        True,
    )
    assert (options.csharp_namespace, options.ruby_package, options.php_namespace, options.objc_class_prefix) == (
        "Chat.V1",
        "Chat::V1",
        "Chat\\V1",
        "CXX",
    )


async def test_the_servicer_serves_every_method_of_the_proto_in_its_shape(server: ChatServer) -> None:
    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
    table = method_handlers(ChatServicer(server.registry))
    assert set(table) == {method.name for method in service.methods}
    for method in service.methods:
        handler = table[method.name]
        shape = (handler.request_streaming, handler.response_streaming)
        assert shape == (method.client_streaming, method.server_streaming), method.name
