"""Server reflection under both names tools use: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection serves only ``v1alpha``; tools that speak only ``v1`` (newer grpcurl,
Postman, grpc-java's and grpc-go's own clients) got UNIMPLEMENTED. The two versions
are the same protocol on the wire (identical messages and field numbers, another
package name), so the ``v1`` method is the same servicer registered under the ``v1``
path with the ``v1alpha`` messages' (de)serializers.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (both reflection services are added to them)."""
    names = (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)  # the one v1alpha's path serves too
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call,unused-ignore]
        servicer, server
    )
    handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
