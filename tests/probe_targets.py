"""Services for the registry to probe, started by the tests on loopback.

- HttpTarget: an HTTP/1.1 server on Trio, written by hand, on one port or
  many, plain or over TLS; it records every request (its port, path and
  User-Agent) and answers as the test says: a status, a redirect, no answer
  at all, or a hang.
- TcpTarget: a listener that accepts connections and closes them, until
  the test closes it.
- grpc_health_server: grpcio's own server in its threads, running the
  official grpcio-health-checking servicer.
- KubernetesApi: an HTTP(S) server answering the Kubernetes API's pod path,
  /api/v1/namespaces/{ns}/pods/{name}, with the JSON the API server sends.
- tls_server: a server-side TLS context with a certificate from a test CA.

Each server reports its ports once it listens, and each test waits on the
hits it expects through `wait_for_hits`, never on a sleep.
"""

from __future__ import annotations

import base64
import enum
import json
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import trio
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from harness import WAIT

_MAX_HEAD = 65536
_REASONS = {
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Mode(enum.Enum):
    ANSWER = "answer"
    # Accept, read the request, close without a word.
    SILENT = "silent"
    # Accept, read the request, never answer (until the client hangs up).
    HANG = "hang"


@dataclass(frozen=True)
class Hit:
    port: int
    path: str
    headers: dict[str, str]
    time: float


@dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)


def tls_server(ca: trustme.CA, *identities: str, **cert: Any) -> ssl.SSLContext:
    """A server's TLS context, its certificate issued by `ca` for
    `identities` (127.0.0.1 unless given); `cert` goes to issue_cert."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(identities or ("127.0.0.1",)), **cert).configure_cert(context)
    return context


class HttpTarget:
    """An HTTP server on loopback, over TLS with `tls`; `respond` decides each
    answer."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.mode = Mode.ANSWER
        # (port, path) -> the answer; the default answers 200 "ok".
        self.respond: Callable[[int, str], HttpResponse] = lambda port, path: (
            HttpResponse()
        )
        self.hits: list[Hit] = []
        # Answers sent, by port, for tests that count successes.
        self.answered: dict[int, int] = {}
        self.ports: list[int] = []
        # Requests held unanswered in Mode.HANG: now, and at most at once.
        self.hanging = 0
        self.most_hanging = 0
        self._hit = trio.Event()

    async def serve(self, nursery: trio.Nursery, count: int = 1) -> list[int]:
        """Listen on `count` free ports of 127.0.0.1; returns them."""
        listeners: list[trio.SocketListener] = []
        for _ in range(count):
            listeners += await trio.open_tcp_listeners(0, host="127.0.0.1")
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        self.ports += ports
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return ports

    async def wait_for_hits(self, count: int, port: int | None = None) -> list[Hit]:
        """Return once `count` requests (to `port`, if given) have come in."""
        with trio.fail_after(WAIT):
            while True:
                hits = [h for h in self.hits if port is None or h.port == port]
                if len(hits) >= count:
                    return hits
                await self._hit.wait()

    async def _handle(self, connection: trio.SocketStream) -> None:
        port = connection.socket.getsockname()[1]
        stream: trio.abc.Stream = connection
        if self.tls is not None:
            # The handshake happens on the first receive: a client that
            # refuses the certificate breaks the stream there.
            stream = trio.SSLStream(connection, self.tls, server_side=True)
        try:
            head = await _read_head(stream)
            if head is None:
                return
            request_line, headers = head
            path = request_line.split(" ")[1]
            self.hits.append(Hit(port, path, headers, trio.current_time()))
            self._hit.set()
            self._hit = trio.Event()
            if self.mode is Mode.SILENT:
                return
            if self.mode is Mode.HANG:
                self.hanging += 1
                self.most_hanging = max(self.most_hanging, self.hanging)
                try:
                    # Until the client gives up and closes the connection.
                    while await stream.receive_some(4096):
                        pass
                    return
                finally:
                    self.hanging -= 1
            answer = self.respond(port, path)
            await stream.send_all(_encode(answer))
            self.answered[port] = self.answered.get(port, 0) + 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


async def _read_head(stream: trio.abc.Stream) -> tuple[str, dict[str, str]] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk or len(data) > _MAX_HEAD:
            return None
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return lines[0], headers


def _encode(answer: HttpResponse) -> bytes:
    reason = _REASONS.get(answer.status, "Status")
    headers = {
        "Content-Length": str(len(answer.body)),
        "Connection": "close",
        **answer.headers,
    }
    head = f"HTTP/1.1 {answer.status} {reason}\r\n" + "".join(
        f"{key}: {value}\r\n" for key, value in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + answer.body


class TcpTarget:
    """A listener that accepts and closes connections until closed."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._listeners: list[trio.SocketListener] = []

    async def serve(self, nursery: trio.Nursery) -> int:
        self._listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = self._listeners[0].socket.getsockname()[1]
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)
        return self.port

    async def _run(self) -> None:
        assert self._scope is not None
        with self._scope:
            await trio.serve_listeners(self._accept, self._listeners)

    async def _accept(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        await stream.aclose()

    async def close(self) -> None:
        """Stop listening: connections are refused from now on."""
        assert self._scope is not None
        self._scope.cancel()
        for listener in self._listeners:
            await listener.aclose()


@contextmanager
def grpc_health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    """grpcio's server with the official health servicer, on a free port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None).wait(WAIT)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def pod(namespace: str, name: str, *, ready: bool) -> dict[str, Any]:
    """A Pod as the Kubernetes API returns it (v1, trimmed of managedFields)."""
    status = "True" if ready else "False"
    not_ready = {
        "reason": "ContainersNotReady",
        "message": "containers with unready status: [web]",
    }
    condition_extra = {} if ready else not_ready
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "5f0c1a52-7a3e-4c1e-9a53-1b2f0d7c9e11",
            "resourceVersion": "48213",
            "creationTimestamp": "2026-12-03T14:00:00Z",
            "labels": {"app": "web"},
        },
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example/web:1.4.2",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                        "periodSeconds": 10,
                    },
                }
            ],
            "restartPolicy": "Always",
            "nodeName": "node-1",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {
                    "type": "Initialized",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": "2026-12-03T14:00:01Z",
                },
                {
                    "type": "Ready",
                    "status": status,
                    "lastProbeTime": None,
                    "lastTransitionTime": "2026-12-03T14:00:09Z",
                    **condition_extra,
                },
                {
                    "type": "ContainersReady",
                    "status": status,
                    "lastProbeTime": None,
                    "lastTransitionTime": "2026-12-03T14:00:09Z",
                    **condition_extra,
                },
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": "2026-12-03T14:00:00Z",
                },
            ],
            "hostIP": "10.0.3.1",
            "podIP": "10.244.1.17",
            "podIPs": [{"ip": "10.244.1.17"}],
            "startTime": "2026-12-03T14:00:00Z",
            "containerStatuses": [
                {
                    "name": "web",
                    "ready": ready,
                    "restartCount": 0,
                    "image": "registry.example/web:1.4.2",
                    "imageID": "registry.example/web@sha256:" + "0" * 64,
                    "containerID": "containerd://" + "a" * 64,
                    "started": True,
                    "state": {"running": {"startedAt": "2026-12-03T14:00:02Z"}},
                }
            ],
            "qosClass": "BestEffort",
        },
    }


def not_found(namespace: str, name: str) -> dict[str, Any]:
    """The API server's Status body for a pod that does not exist."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'pods "{name}" not found',
        "reason": "NotFound",
        "details": {"name": name, "kind": "pods"},
        "code": 404,
    }


class KubernetesApi:
    """The pod path of the Kubernetes API, over an HttpTarget.

    `pods` maps (namespace, name) to readiness; a pod missing from it gets
    the API's 404 Status.
    """

    TOKEN = "test-service-account-token"

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.pods: dict[tuple[str, str], bool] = {}
        self.http = HttpTarget(tls)
        self.http.respond = self._respond
        self.port = 0

    async def serve(self, nursery: trio.Nursery) -> int:
        [self.port] = await self.http.serve(nursery)
        return self.port

    def kubeconfig(
        self, user: dict[str, Any] | None = None, ca: trustme.CA | None = None
    ) -> str:
        """A kubeconfig for this server, as kubectl writes it (YAML is a
        superset of JSON), for the user `registry`: a static token unless
        `user` says otherwise. With `ca`, the server is HTTPS and trusted
        through that CA's certificate, as a service account's ca.crt is."""
        cluster: dict[str, Any] = {"server": f"http://127.0.0.1:{self.port}"}
        if ca is not None:
            cluster = {
                "server": f"https://127.0.0.1:{self.port}",
                "certificate-authority-data": base64.b64encode(
                    ca.cert_pem.bytes()
                ).decode(),
            }
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": cluster,
                    }
                ],
                "users": [{"name": "registry", "user": user or {"token": self.TOKEN}}],
                "contexts": [
                    {
                        "name": "test",
                        "context": {"cluster": "test", "user": "registry"},
                    }
                ],
                "current-context": "test",
            }
        )

    def _respond(self, port: int, path: str) -> HttpResponse:
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) != 6 or parts[:3] != ["api", "v1", "namespaces"]:
            return HttpResponse(404, b"not an API path")
        namespace, kind, name = parts[3], parts[4], parts[5]
        if kind != "pods":
            return HttpResponse(404, b"not a pod path")
        ready = self.pods.get((namespace, name))
        body = (
            not_found(namespace, name)
            if ready is None
            else pod(namespace, name, ready=ready)
        )
        return HttpResponse(
            200 if ready is not None else 404,
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
