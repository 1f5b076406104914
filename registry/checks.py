"""The check kinds: each probes one instance once and reports what it saw.

Thin Trio shells, one per kind:

- HTTP(S): GET of the check's path on a fresh connection; 2xx is healthy, a
  redirect is a failure unless the check follows redirects. As Kubernetes
  probes do, HTTPS certificates are not verified and no proxy is used: a
  probe asks whether the service answers, not whom to trust.
- gRPC: grpc.health.v1.Health/Check (for the check's service name, "" for
  the whole server), over purerpc's HTTP/2 protocol layer in a Trio shell,
  as the registry's own server is. SERVING is healthy.
- TCP: a connection is accepted.
- Kubernetes: the pod's Ready condition, read from the Kubernetes API with
  lightkube (built on httpx2, and so usable from Trio through anyio), with
  the in-cluster service account or a kubeconfig. The credentials are read
  once, when the Checker opens; what is wrong with them is the error of
  every Kubernetes probe.

TTL checks are not probed: the service heartbeats, and the prober counts a
passed deadline as a failure (see registry.probes).

Every probe runs under its timeout, and no failure of the target escapes as
an exception: it is a ProbeResult with healthy=False and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import h2.exceptions
import httpx2
import lightkube
import trio
import yaml
from grpc_health.v1 import health_pb2
from lightkube.config.kubeconfig import SERVICE_ACCOUNT, SingleConfig
from lightkube.resources.core_v1 import Pod
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, ResponseEnded
from purerpc.grpclib.exceptions import ProtocolError

from .model import Api, CheckKind, HealthCheck

__all__ = ["Checker", "ProbeResult", "Target"]

log = logging.getLogger("registry.checks")

# The API a check probes when it names none, by kind, in order of preference;
# failing those, the instance's first API.
_PREFERRED_APIS = {
    CheckKind.HTTP: ("http", "https"),
    CheckKind.GRPC: ("grpc",),
    CheckKind.TCP: (),
}
# Of a failed HTTP answer's body, this much goes into the probe's error.
_BODY_EXCERPT = 200
_RECEIVE_SIZE = 65536
# The longest error text a probe reports.
_MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class ProbeResult:
    healthy: bool
    # The HTTP status (Kubernetes: of the API's answer), or the gRPC health
    # status; 0 when there was none.
    code: int = 0
    error: str = ""
    latency: float = 0.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where an instance is reached."""

    address: str
    apis: tuple[Api, ...]


class _Failed(Exception):
    """A probe's failure, with what to report."""

    def __init__(self, error: str, code: int = 0) -> None:
        super().__init__(error)
        self.error = error
        self.code = code


class Checker:
    """Runs probes; holds the clients they share. Open with Checker.open()."""

    def __init__(
        self, http: httpx2.AsyncClient, kube: _KubeClient | str, *, user_agent: str
    ) -> None:
        self._http = http
        self._user_agent = user_agent
        # The Kubernetes client, or why there is none.
        self._kube = kube

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        user_agent: str = "registry-probe",
        kubeconfig: str = "",
        service_account: str = SERVICE_ACCOUNT,
    ) -> AsyncIterator[Checker]:
        """`kubeconfig`: a kubeconfig file for Kubernetes checks; empty uses
        the service account in the `service_account` directory (with
        KUBERNETES_SERVICE_HOST and _PORT), else $KUBECONFIG or
        ~/.kube/config."""
        http = httpx2.AsyncClient(
            verify=False,
            trust_env=False,
            # A fresh connection per probe: a kept-alive one would hide a
            # service that no longer accepts connections.
            limits=httpx2.Limits(max_keepalive_connections=0),
            headers={"User-Agent": user_agent},
        )
        # A few small files, read once and synchronously: no probe waits on
        # them, and the replica uses no threads.
        kube = _kube_client(kubeconfig, service_account)
        checker = cls(http, kube, user_agent=user_agent)
        try:
            yield checker
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()
                if isinstance(kube, _KubeClient):
                    await kube.client.close()

    async def probe(
        self, check: HealthCheck, target: Target, time_limit: float
    ) -> ProbeResult:
        """Probe `target` once as `check` says, within `time_limit` seconds."""
        started = trio.current_time()
        code = 0
        error = ""
        with trio.move_on_after(time_limit) as deadline:
            try:
                code = await self._probe(check, target, time_limit)
            except _Failed as exc:
                code, error = exc.code, exc.error
            except Exception as exc:
                # An answer no handler above expects (garbage where a protobuf
                # or a pod should be, say) fails the probe, never the replica.
                log.warning(
                    "probe of %s (%s check) failed unexpectedly",
                    target.address,
                    check.kind.value,
                    exc_info=True,
                )
                code, error = 0, f"unexpected failure: {_describe(exc)}"
        if deadline.cancelled_caught:
            error = f"no answer within {time_limit:g}s"
        latency = trio.current_time() - started
        return ProbeResult(
            not error, code=code, error=_printable(error), latency=latency
        )

    async def _probe(
        self, check: HealthCheck, target: Target, time_limit: float
    ) -> int:
        if check.kind is CheckKind.KUBERNETES:
            return await self._kubernetes(check.namespace, check.pod)
        port = _port(check, target.apis)
        if check.kind is CheckKind.HTTP:
            return await self._http_get(check, target.address, port, time_limit)
        if check.kind is CheckKind.GRPC:
            return await _grpc_health(target.address, port, check.service, time_limit)
        if check.kind is CheckKind.TCP:
            await _tcp_connect(target.address, port)
            return 0
        raise _Failed(f"{check.kind.value} checks are not probed")

    async def _http_get(
        self, check: HealthCheck, address: str, port: int, time_limit: float
    ) -> int:
        scheme = "https" if check.https else "http"
        url = f"{scheme}://{_url_host(address)}:{port}{check.path or '/'}"
        try:
            async with self._http.stream(
                "GET",
                url,
                follow_redirects=check.follow_redirects,
                timeout=time_limit,
            ) as response:
                code = response.status_code
                if 200 <= code < 300:
                    return code
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    raise _Failed(
                        f"HTTP {code}: redirect to {location!r} not followed", code
                    )
                body = await _excerpt(response)
                raise _Failed(f"HTTP {code}" + (f": {body}" if body else ""), code)
        except httpx2.TooManyRedirects as exc:
            raise _Failed(f"GET {url}: {exc}") from None
        except httpx2.HTTPError as exc:
            raise _Failed(f"GET {url}: {_describe(exc)}") from None

    async def _kubernetes(self, namespace: str, pod_name: str) -> int:
        kube = self._kube
        if not isinstance(kube, _KubeClient):
            raise _Failed(kube)
        try:
            pod = await kube.client.get(Pod, pod_name, namespace=namespace)
        except lightkube.ApiError as exc:
            raise _Failed(
                f"pod {namespace}/{pod_name}: {exc.status.message or exc}",
                exc.status.code or 0,
            ) from None
        except lightkube.ConfigError as exc:
            # A token file gone.
            raise _Failed(
                f"Kubernetes credentials of user {kube.user!r}: {_describe(exc)}"
            ) from None
        except httpx2.HTTPError as exc:
            raise _Failed(f"the Kubernetes API: {_describe(exc)}") from None
        conditions = (pod.status.conditions if pod.status else None) or []
        ready = next((c for c in conditions if c.type == "Ready"), None)
        if ready is not None and ready.status == "True":
            return 200
        if ready is None:
            phase = pod.status.phase if pod.status else None
            raise _Failed(
                f"pod {namespace}/{pod_name} has no Ready condition (phase {phase})",
                200,
            )
        why = ": ".join(part for part in (ready.reason, ready.message) if part)
        raise _Failed(
            f"pod {namespace}/{pod_name} is not ready" + (f": {why}" if why else ""),
            200,
        )


@dataclass(frozen=True, slots=True)
class _KubeClient:
    client: lightkube.AsyncClient
    # The kubeconfig user it acts as, for error messages.
    user: str


# What reading a kubeconfig or a service account can raise: a file missing
# or unreadable, YAML that is not a kubeconfig, a service account without
# KUBERNETES_SERVICE_HOST.
_CONFIG_ERRORS = (lightkube.ConfigError, OSError, KeyError, ValueError, yaml.YAMLError)


def _kube_client(kubeconfig: str, service_account: str) -> _KubeClient | str:
    """The Kubernetes client, or the error every Kubernetes probe reports."""
    try:
        if kubeconfig:
            found = lightkube.KubeConfig.from_file(kubeconfig)
        else:
            found = lightkube.KubeConfig.from_env(service_account=service_account)
        # Raises rather than return None: no default is given.
        config = found.get()
        assert config is not None
    except _CONFIG_ERRORS as exc:
        error = (
            f"no Kubernetes credentials: {_describe(exc)}; run in a pod with a "
            "service account, or set REGISTRY_KUBECONFIG"
        )
        if kubeconfig:
            log.warning("Kubernetes checks will fail: %s", error)
        return error

    user = config.context.user or ""
    try:
        _check_exec(config)
        client = lightkube.AsyncClient(config, trust_env=False)
    except (lightkube.ConfigError, OSError, ValueError) as exc:
        # An exec plugin this client cannot run, an auth-provider, a CA file
        # that does not load.
        error = f"unusable Kubernetes credentials of user {user!r}: {_describe(exc)}"
        log.warning("Kubernetes checks will fail: %s", error)
        return error
    return _KubeClient(client, user)


def _check_exec(config: SingleConfig) -> None:
    """Refuse a user whose token comes from an exec plugin.

    TODO: exec plugins (the token commands of EKS, GKE and OIDC logins) are
    refused: lightkube runs them with asyncio's subprocess API, which fails
    in a Trio task, and its calls cannot move to the trio-asyncio loop since
    httpx2's anyio backend finds no running asyncio loop there. Supporting
    them means an httpx2 auth flow of our own that runs the command with
    trio.run_process.
    """
    plugin = config.user.exec if config.user else None
    if plugin is not None:
        raise lightkube.ConfigError(
            f"its token comes from the exec plugin {plugin.command!r}, which the "
            "registry cannot run; give it a service account, or a kubeconfig user "
            "with a token or a client certificate"
        )


def _port(check: HealthCheck, apis: tuple[Api, ...]) -> int:
    by_name = {api.name: api for api in apis}
    api = by_name.get(check.api) if check.api else None
    if api is None and not check.api:
        preferred = (by_name[n] for n in _PREFERRED_APIS[check.kind] if n in by_name)
        api = next(preferred, apis[0] if apis else None)
    if api is None:
        wanted = f"api {check.api!r}" if check.api else "any api"
        raise _Failed(f"no port to probe: the instance has no {wanted}")
    if not api.port:
        raise _Failed(f"no port to probe: api {api.name!r} has no port")
    return api.port


def _url_host(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return f"[{address}]" if ip.version == 6 else address


def _printable(text: str) -> str:
    """`text` cut to a length fit for a log line and a history row, without
    the control characters (NUL above all, which Postgres text refuses) that
    a target may put in its answer."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    if len(cleaned) > _MAX_ERROR:
        cleaned = cleaned[: _MAX_ERROR - 3] + "..."
    return cleaned


def _describe(exc: BaseException) -> str:
    text = str(exc)
    # trio and httpx name the reason in a cause, sometimes under layers that
    # say nothing (a TLS failure: ConnectError, ConnectError,
    # BrokenResourceError, then SSLCertVerificationError).
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause) not in text:
        text = f"{text} ({cause})" if text else str(cause)
    return text or type(exc).__name__


async def _excerpt(response: httpx2.Response) -> str:
    body = b""
    # Read to the end, under the probe's time limit: httpx2's inner stream
    # generator is left unclosed if the reading stops early.
    async for chunk in response.aiter_raw():
        if len(body) < _BODY_EXCERPT:
            body += chunk
    text = body[:_BODY_EXCERPT].decode("utf-8", "replace")
    return " ".join(text.split())


async def _tcp_connect(address: str, port: int) -> None:
    try:
        stream = await trio.open_tcp_stream(address, port)
    except OSError as exc:
        raise _Failed(f"connect to {address}:{port}: {_describe(exc)}") from None
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _grpc_health(address: str, port: int, service: str, time_limit: float) -> int:
    """One grpc.health.v1.Health/Check call on a connection of its own."""
    try:
        sock = await trio.open_tcp_stream(address, port)
    except OSError as exc:
        raise _Failed(f"connect to {address}:{port}: {_describe(exc)}") from None
    try:
        return await _health_call(sock, f"{address}:{port}", service, time_limit)
    except (ProtocolError, h2.exceptions.ProtocolError) as exc:
        raise _Failed(f"gRPC to {address}:{port}: {_describe(exc)}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise _Failed(f"gRPC to {address}:{port}: {_describe(exc)}") from None
    finally:
        with trio.CancelScope(shield=True):
            await sock.aclose()


async def _health_call(
    sock: trio.SocketStream, authority: str, service: str, time_limit: float
) -> int:
    connection = GRPCConnection(GRPCConfiguration(client_side=True))
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    connection.start_request(
        stream_id,
        "http",
        "grpc.health.v1.Health",
        "Check",
        health_pb2.HealthCheckRequest.DESCRIPTOR.full_name,
        authority,
        timeout=timedelta(seconds=time_limit),
    )
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    connection.send_data(
        stream_id, struct.pack(">?I", False, len(request)) + request, end_stream=True
    )
    await sock.send_all(connection.data_to_send())

    message: bytes | None = None
    while True:
        data = await sock.receive_some(_RECEIVE_SIZE)
        if not data:
            raise _Failed(f"gRPC to {authority}: the server closed the connection")
        ended: Any = None
        for event in connection.receive_data(data):
            if isinstance(event, MessageReceived) and event.stream_id == stream_id:
                message = event.data
            elif isinstance(event, ResponseEnded) and event.stream_id == stream_id:
                ended = event
        # Settings acknowledgements and window updates.
        pending = connection.data_to_send()
        if pending:
            await sock.send_all(pending)
        if ended is not None:
            break

    status = ended.status
    if status.int_value != 0:
        raise _Failed(
            f"Health/Check: {status.status_code.name}: {status.status_message}"
        )
    if message is None:
        raise _Failed("Health/Check answered OK without a message")
    answer = health_pb2.HealthCheckResponse.FromString(message)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        raise _Failed(f"Health/Check: {name}", answer.status)
    return int(answer.status)
