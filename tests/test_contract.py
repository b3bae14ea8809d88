"""The proto as other languages' generators see it: every per-language option set, so protoc needs no flags."""

from __future__ import annotations

from chat_service._pb.chat.v1 import chat_pb2


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
