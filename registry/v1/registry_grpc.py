import purerpc
import registry.v1.registry_pb2 as registry_dot_v1_dot_registry__pb2
import google.protobuf.duration_pb2 as google_dot_protobuf_dot_duration__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class RegistryServicer(purerpc.Servicer):
    async def Register(self, input_message):
        raise NotImplementedError()

    async def Deregister(self, input_message):
        raise NotImplementedError()

    async def Resolve(self, input_message):
        raise NotImplementedError()

    async def List(self, input_message):
        raise NotImplementedError()

    async def Watch(self, input_message):
        raise NotImplementedError()

    async def Heartbeat(self, input_message):
        raise NotImplementedError()

    async def Drain(self, input_message):
        raise NotImplementedError()

    async def History(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "registry.v1.Registry"
        )
        service_obj.add_method(
            "Register",
            self.Register,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.RegisterRequest,
                registry_dot_v1_dot_registry__pb2.RegisterResponse,
            )
        )
        service_obj.add_method(
            "Deregister",
            self.Deregister,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.DeregisterRequest,
                registry_dot_v1_dot_registry__pb2.DeregisterResponse,
            )
        )
        service_obj.add_method(
            "Resolve",
            self.Resolve,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.ResolveRequest,
                registry_dot_v1_dot_registry__pb2.ResolveResponse,
            )
        )
        service_obj.add_method(
            "List",
            self.List,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.ListRequest,
                registry_dot_v1_dot_registry__pb2.ListResponse,
            )
        )
        service_obj.add_method(
            "Watch",
            self.Watch,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                registry_dot_v1_dot_registry__pb2.WatchRequest,
                registry_dot_v1_dot_registry__pb2.WatchResponse,
            )
        )
        service_obj.add_method(
            "Heartbeat",
            self.Heartbeat,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.HeartbeatRequest,
                registry_dot_v1_dot_registry__pb2.HeartbeatResponse,
            )
        )
        service_obj.add_method(
            "Drain",
            self.Drain,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.DrainRequest,
                registry_dot_v1_dot_registry__pb2.DrainResponse,
            )
        )
        service_obj.add_method(
            "History",
            self.History,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.HistoryRequest,
                registry_dot_v1_dot_registry__pb2.HistoryResponse,
            )
        )
        return service_obj


class RegistryStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "registry.v1.Registry",
            channel
        )
        self.Register = self._client.get_method_stub(
            "Register",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.RegisterRequest,
                registry_dot_v1_dot_registry__pb2.RegisterResponse,
            )
        )
        self.Deregister = self._client.get_method_stub(
            "Deregister",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.DeregisterRequest,
                registry_dot_v1_dot_registry__pb2.DeregisterResponse,
            )
        )
        self.Resolve = self._client.get_method_stub(
            "Resolve",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.ResolveRequest,
                registry_dot_v1_dot_registry__pb2.ResolveResponse,
            )
        )
        self.List = self._client.get_method_stub(
            "List",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.ListRequest,
                registry_dot_v1_dot_registry__pb2.ListResponse,
            )
        )
        self.Watch = self._client.get_method_stub(
            "Watch",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                registry_dot_v1_dot_registry__pb2.WatchRequest,
                registry_dot_v1_dot_registry__pb2.WatchResponse,
            )
        )
        self.Heartbeat = self._client.get_method_stub(
            "Heartbeat",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.HeartbeatRequest,
                registry_dot_v1_dot_registry__pb2.HeartbeatResponse,
            )
        )
        self.Drain = self._client.get_method_stub(
            "Drain",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.DrainRequest,
                registry_dot_v1_dot_registry__pb2.DrainResponse,
            )
        )
        self.History = self._client.get_method_stub(
            "History",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                registry_dot_v1_dot_registry__pb2.HistoryRequest,
                registry_dot_v1_dot_registry__pb2.HistoryResponse,
            )
        )