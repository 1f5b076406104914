"""gRPC server reflection, so that generic tools (grpcurl, grpcui, Postman)
can list the services and call them without the .proto files.

Both versions of the protocol are served: `grpc.reflection.v1alpha`, which
grpcio-reflection's client speaks, and `grpc.reflection.v1`, which newer
tools try first. The two differ in their package name only, so one set of
message classes (v1alpha's, from grpcio-reflection) encodes both on the wire;
v1's descriptor, made from v1alpha's by renaming its package, is added to the
descriptor pool so that a tool can describe v1 itself.

Answers come from protobuf's default descriptor pool, where every generated
module the replica imported (the Registry API, grpc.health.v1, reflection)
registered its file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as pb
from purerpc.grpclib.status import StatusCode

from ._grpc import Call, Method, Service

__all__ = ["SERVICE_NAMES", "Reflection"]

_V1ALPHA = "grpc.reflection.v1alpha"
_V1 = "grpc.reflection.v1"
SERVICE_NAMES = (f"{_V1ALPHA}.ServerReflection", f"{_V1}.ServerReflection")


def _renamed(type_name: str) -> str:
    return type_name.replace(f".{_V1ALPHA}.", f".{_V1}.")


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put grpc/reflection/v1/reflection.proto in the pool, unless a module
    already did."""
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name = name
    proto.package = _V1
    proto.ClearField("options")
    # Fields that name a type (an unset type_name must stay unset).
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = _renamed(message_field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def _with_dependencies(descriptor: FileDescriptor) -> list[bytes]:
    """The file and every file it imports, transitively, serialized; the file
    itself first, as grpc's own servers send them."""
    seen: dict[str, FileDescriptor] = {}
    pending = [descriptor]
    while pending:
        current = pending.pop()
        if current.name in seen:
            continue
        seen[current.name] = current
        pending.extend(current.dependencies)
    serialized = []
    for file in seen.values():
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        serialized.append(proto.SerializeToString())
    return serialized


class Reflection:
    """The ServerReflection service over the services a server offers."""

    def __init__(
        self,
        service_names: Iterable[str],
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()
        _add_v1_descriptor(self._pool)
        self._service_names = sorted({*service_names, *SERVICE_NAMES})

    def services(self) -> list[Service]:
        method = Method(
            pb.ServerReflectionRequest,
            self.info,
            streaming=True,
            request_streaming=True,
        )
        return [
            Service(name, {"ServerReflectionInfo": method}) for name in SERVICE_NAMES
        ]

    async def info(
        self, requests: AsyncIterator[pb.ServerReflectionRequest], call: Call
    ) -> None:
        """Answer each request in turn, until the client ends its stream."""
        async for request in requests:
            await call.send(self.answer(request))

    def answer(
        self, request: pb.ServerReflectionRequest
    ) -> pb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        response = pb.ServerReflectionResponse(
            valid_host=request.host, original_request=request
        )
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    pb.ServiceResponse(name=name) for name in self._service_names
                )
            elif kind == "file_by_filename":
                self._files(
                    response, self._pool.FindFileByName(request.file_by_filename)
                )
            elif kind == "file_containing_symbol":
                self._files(
                    response,
                    self._pool.FindFileContainingSymbol(request.file_containing_symbol),
                )
            elif kind == "file_containing_extension":
                extendee = self._pool.FindMessageTypeByName(
                    request.file_containing_extension.containing_type
                )
                extension = self._pool.FindExtensionByNumber(
                    extendee, request.file_containing_extension.extension_number
                )
                self._files(
                    response, self._pool.FindFileContainingSymbol(extension.full_name)
                )
            elif kind == "all_extension_numbers_of_type":
                extendee = self._pool.FindMessageTypeByName(
                    request.all_extension_numbers_of_type
                )
                numbers = response.all_extension_numbers_response
                numbers.base_type_name = extendee.full_name
                numbers.extension_number.extend(
                    sorted(e.number for e in self._pool.FindAllExtensions(extendee))
                )
            else:
                return self._error(
                    response,
                    StatusCode.INVALID_ARGUMENT,
                    "the request names no question: set one of list_services, "
                    "file_by_filename, file_containing_symbol, "
                    "file_containing_extension, all_extension_numbers_of_type",
                )
        except KeyError:
            asked = str(getattr(request, kind)).strip().replace("\n", ", ")
            return self._error(
                response,
                StatusCode.NOT_FOUND,
                f"{kind.replace('_', ' ')}: {asked!r} is not known to this server",
            )
        return response

    @staticmethod
    def _files(response: pb.ServerReflectionResponse, file: FileDescriptor) -> None:
        response.file_descriptor_response.file_descriptor_proto.extend(
            _with_dependencies(file)
        )

    @staticmethod
    def _error(
        response: pb.ServerReflectionResponse, code: StatusCode, message: str
    ) -> pb.ServerReflectionResponse:
        response.error_response.error_code = code.value
        response.error_response.error_message = message
        return response
