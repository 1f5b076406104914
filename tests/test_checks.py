"""Each check kind against a real server started by the test: HTTP, gRPC
(grpcio's server with the official health servicer), TCP, and the pod path
of the Kubernetes API. The checker runs as the prober runs it, without a
database; registry-level behaviour is in test_probing.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from probe_targets import (
    NOT_SERVING,
    SERVING,
    HttpResponse,
    HttpTarget,
    KubernetesApi,
    Mode,
    TcpTarget,
    grpc_health_server,
    tls_server,
)
from registry.checks import Checker, ProbeResult, Target
from registry.model import Api, CheckKind, HealthCheck

TIME_LIMIT = 1.0


@pytest.fixture
async def checker() -> AsyncIterator[Checker]:
    async with Checker.open(user_agent="registry-probe (test)") as opened:
        yield opened


@pytest.fixture
async def http(nursery: trio.Nursery) -> HttpTarget:
    target = HttpTarget()
    await target.serve(nursery)
    return target


def http_check(**fields: object) -> HealthCheck:
    return HealthCheck(kind=CheckKind.HTTP, path="/healthz", **fields)  # type: ignore[arg-type]


def at(port: int, name: str = "http") -> Target:
    return Target("127.0.0.1", (Api(name, port),))


async def test_http_check_is_healthy_on_2xx_and_sends_path_and_user_agent(
    checker: Checker, http: HttpTarget
) -> None:
    http.respond = lambda port, path: HttpResponse(204, b"")

    result = await checker.probe(http_check(), at(http.ports[0]), TIME_LIMIT)

    assert (result.healthy, result.code, result.error) == (True, 204, "")
    [hit] = http.hits
    assert hit.path == "/healthz"
    assert hit.headers["user-agent"] == "registry-probe (test)"
    assert 0 < result.latency < TIME_LIMIT


async def test_http_check_fails_on_5xx_with_the_start_of_the_body(
    checker: Checker, http: HttpTarget
) -> None:
    http.respond = lambda port, path: HttpResponse(
        503, b"database\r\n   unreachable" + b"x" * 500
    )

    result = await checker.probe(http_check(), at(http.ports[0]), TIME_LIMIT)

    assert (result.healthy, result.code) == (False, 503)
    assert result.error.startswith("HTTP 503: database unreachablexxx")
    assert len(result.error) < 250


async def test_http_check_error_holds_no_control_characters(
    checker: Checker, http: HttpTarget
) -> None:
    # Postgres text cannot hold NUL: the history row would fail to write.
    http.respond = lambda port, path: HttpResponse(500, b"bad\x00news\r\n\x1b[31m")

    result = await checker.probe(http_check(), at(http.ports[0]), TIME_LIMIT)

    assert result.error == "HTTP 500: bad news  [31m"
    assert result.error.isprintable()


async def test_http_check_does_not_follow_a_redirect_unless_asked(
    checker: Checker, http: HttpTarget
) -> None:
    def respond(port: int, path: str) -> HttpResponse:
        if path == "/healthz":
            return HttpResponse(302, b"", {"Location": "/elsewhere"})
        return HttpResponse(200)

    http.respond = respond

    plain = await checker.probe(http_check(), at(http.ports[0]), TIME_LIMIT)
    following = await checker.probe(
        http_check(follow_redirects=True), at(http.ports[0]), TIME_LIMIT
    )

    assert (plain.healthy, plain.code) == (False, 302)
    assert "redirect to '/elsewhere' not followed" in plain.error
    assert (following.healthy, following.code) == (True, 200)
    assert [hit.path for hit in http.hits] == ["/healthz", "/healthz", "/elsewhere"]


async def test_http_check_fails_when_the_server_closes_without_answering(
    checker: Checker, http: HttpTarget
) -> None:
    http.mode = Mode.SILENT

    result = await checker.probe(http_check(), at(http.ports[0]), TIME_LIMIT)

    assert (result.healthy, result.code) == (False, 0)
    assert result.error.startswith(f"GET http://127.0.0.1:{http.ports[0]}/healthz: ")


async def test_http_check_fails_at_its_time_limit_when_the_server_hangs(
    checker: Checker, http: HttpTarget
) -> None:
    http.mode = Mode.HANG

    with trio.fail_after(TIME_LIMIT + 2):
        result = await checker.probe(http_check(), at(http.ports[0]), 0.3)

    assert result == ProbeResult(
        False, error="no answer within 0.3s", latency=result.latency
    )
    assert 0.3 <= result.latency < 1.3


async def test_http_check_fails_when_nothing_listens(checker: Checker) -> None:
    closed = TcpTarget()
    async with trio.open_nursery() as nursery:
        port = await closed.serve(nursery)
        await closed.close()

    result = await checker.probe(http_check(), at(port), TIME_LIMIT)

    assert not result.healthy
    assert f"127.0.0.1:{port}" in result.error


async def test_http_check_probes_the_named_api_else_one_called_http(
    checker: Checker, nursery: trio.Nursery
) -> None:
    target = HttpTarget()
    admin, web = await target.serve(nursery, count=2)
    apis = (Api("grpc", 1), Api("admin", admin), Api("http", web))

    await checker.probe(http_check(api="admin"), Target("127.0.0.1", apis), 1.0)
    await checker.probe(http_check(), Target("127.0.0.1", apis), 1.0)
    no_port = await checker.probe(http_check(), Target("127.0.0.1", ()), 1.0)

    assert [hit.port for hit in target.hits] == [admin, web]
    assert no_port == ProbeResult(
        False,
        error="no port to probe: the instance has no any api",
        latency=no_port.latency,
    )


async def test_grpc_check_reads_the_official_health_servicer(
    checker: Checker,
) -> None:
    check = HealthCheck(kind=CheckKind.GRPC)
    named = HealthCheck(kind=CheckKind.GRPC, service="billing.v1.Billing")
    unknown = HealthCheck(kind=CheckKind.GRPC, service="nobody.v1.Nobody")
    with grpc_health_server() as (servicer, port):
        servicer.set("", SERVING)
        servicer.set("billing.v1.Billing", NOT_SERVING)

        serving = await checker.probe(check, at(port, "grpc"), TIME_LIMIT)
        not_serving = await checker.probe(named, at(port, "grpc"), TIME_LIMIT)
        missing = await checker.probe(unknown, at(port, "grpc"), TIME_LIMIT)
        servicer.set("billing.v1.Billing", SERVING)
        recovered = await checker.probe(named, at(port, "grpc"), TIME_LIMIT)

    assert (serving.healthy, serving.code, serving.error) == (True, SERVING, "")
    assert (not_serving.healthy, not_serving.code) == (False, NOT_SERVING)
    assert not_serving.error == "Health/Check: NOT_SERVING"
    assert (missing.healthy, missing.code) == (False, 0)
    assert missing.error.startswith("Health/Check: NOT_FOUND")
    assert recovered.healthy


async def test_grpc_check_fails_against_a_server_without_grpc(
    checker: Checker, http: HttpTarget
) -> None:
    result = await checker.probe(
        HealthCheck(kind=CheckKind.GRPC), at(http.ports[0], "grpc"), TIME_LIMIT
    )

    assert not result.healthy
    assert result.error


async def test_https_check_answers_without_verifying_the_certificate(
    checker: Checker, nursery: trio.Nursery
) -> None:
    # A certificate no one trusts, as a service's self-signed one is.
    target = HttpTarget(tls_server(trustme.CA()))
    [port] = await target.serve(nursery)
    target.respond = lambda port, path: HttpResponse(503, b"warming up")

    result = await checker.probe(http_check(https=True), at(port), TIME_LIMIT)
    plain = await checker.probe(http_check(), at(port), TIME_LIMIT)

    assert (result.healthy, result.code) == (False, 503)
    assert result.error == "HTTP 503: warming up"
    # The TLS port does not answer plain HTTP.
    assert (plain.healthy, plain.code) == (False, 0)
    assert [hit.path for hit in target.hits] == ["/healthz"]


async def test_tcp_check_is_healthy_while_the_port_accepts(
    checker: Checker, nursery: trio.Nursery
) -> None:
    listener = TcpTarget()
    port = await listener.serve(nursery)
    check = HealthCheck(kind=CheckKind.TCP)

    accepting = await checker.probe(check, at(port, "db"), TIME_LIMIT)
    await listener.close()
    refused = await checker.probe(check, at(port, "db"), TIME_LIMIT)

    assert accepting == ProbeResult(True, latency=accepting.latency)
    assert not refused.healthy
    assert refused.error.startswith(f"connect to 127.0.0.1:{port}: ")


async def test_kubernetes_check_reads_the_pods_ready_condition(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = KubernetesApi()
    await api.serve(nursery)
    api.pods[("shop", "web-0")] = True
    api.pods[("shop", "web-1")] = False
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())

    def pod_check(name: str) -> HealthCheck:
        return HealthCheck(kind=CheckKind.KUBERNETES, namespace="shop", pod=name)

    nowhere = Target("10.1.2.3", ())
    async with Checker.open(kubeconfig=str(kubeconfig)) as checker:
        ready = await checker.probe(pod_check("web-0"), nowhere, TIME_LIMIT)
        unready = await checker.probe(pod_check("web-1"), nowhere, TIME_LIMIT)
        missing = await checker.probe(pod_check("web-2"), nowhere, TIME_LIMIT)

    assert (ready.healthy, ready.code, ready.error) == (True, 200, "")
    assert (unready.healthy, unready.code) == (False, 200)
    assert unready.error == (
        "pod shop/web-1 is not ready: ContainersNotReady: "
        "containers with unready status: [web]"
    )
    assert (missing.healthy, missing.code) == (False, 404)
    assert missing.error == 'pod shop/web-2: pods "web-2" not found'
    assert [hit.path for hit in api.http.hits] == [
        "/api/v1/namespaces/shop/pods/web-0",
        "/api/v1/namespaces/shop/pods/web-1",
        "/api/v1/namespaces/shop/pods/web-2",
    ]
    assert {hit.headers["authorization"] for hit in api.http.hits} == {
        f"Bearer {KubernetesApi.TOKEN}"
    }


async def test_kubernetes_check_over_https_trusts_the_clusters_ca_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cluster_ca, other_ca = trustme.CA(), trustme.CA()
    api = KubernetesApi(tls_server(cluster_ca))
    await api.serve(nursery)
    api.pods[("shop", "web-0")] = True
    check = HealthCheck(kind=CheckKind.KUBERNETES, namespace="shop", pod="web-0")
    trusted, untrusted = tmp_path / "trusted", tmp_path / "untrusted"
    trusted.write_text(api.kubeconfig(ca=cluster_ca))
    untrusted.write_text(api.kubeconfig(ca=other_ca))

    async with Checker.open(kubeconfig=str(trusted)) as checker:
        ready = await checker.probe(check, Target("10.1.2.3", ()), TIME_LIMIT)
    async with Checker.open(kubeconfig=str(untrusted)) as checker:
        refused = await checker.probe(check, Target("10.1.2.3", ()), TIME_LIMIT)

    assert (ready.healthy, ready.code, ready.error) == (True, 200, "")
    assert not refused.healthy
    assert refused.error.startswith("the Kubernetes API: ")
    assert "CERTIFICATE_VERIFY_FAILED" in refused.error
    # The refused client never got as far as asking for the pod.
    assert [hit.path for hit in api.http.hits] == ["/api/v1/namespaces/shop/pods/web-0"]


async def test_kubernetes_check_in_a_pod_uses_its_service_account(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Kubernetes mounts into every pod, and the variables it sets.
    cluster_ca = trustme.CA()
    api = KubernetesApi(tls_server(cluster_ca))
    await api.serve(nursery)
    api.pods[("shop", "web-0")] = True
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "namespace").write_text("registry")
    cluster_ca.cert_pem.write_to_path(str(account / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    check = HealthCheck(kind=CheckKind.KUBERNETES, namespace="shop", pod="web-0")

    async with Checker.open(service_account=str(account)) as checker:
        result = await checker.probe(check, Target("10.1.2.3", ()), TIME_LIMIT)

    assert (result.healthy, result.code, result.error) == (True, 200, "")
    [hit] = api.http.hits
    assert hit.headers["authorization"] == "Bearer pod-token"


async def test_kubernetes_check_refuses_a_user_whose_token_comes_from_exec(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = KubernetesApi()
    await api.serve(nursery)
    api.pods[("shop", "web-0")] = True
    plugin = {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "true"}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig(user={"exec": plugin}))
    check = HealthCheck(kind=CheckKind.KUBERNETES, namespace="shop", pod="web-0")

    async with Checker.open(kubeconfig=str(kubeconfig)) as checker:
        result = await checker.probe(check, Target("10.1.2.3", ()), TIME_LIMIT)

    assert not result.healthy
    assert result.error.startswith(
        "unusable Kubernetes credentials of user 'registry': its token comes "
        "from the exec plugin 'true'"
    )
    assert api.http.hits == []


async def test_kubernetes_check_without_credentials_says_how_to_give_them(
    tmp_path: Path,
) -> None:
    check = HealthCheck(kind=CheckKind.KUBERNETES, namespace="shop", pod="web-0")
    missing = tmp_path / "no-such-kubeconfig"

    async with Checker.open(kubeconfig=str(missing)) as checker:
        result = await checker.probe(check, Target("10.1.2.3", ()), TIME_LIMIT)

    assert not result.healthy
    assert result.error.startswith("no Kubernetes credentials: ")
    assert "REGISTRY_KUBECONFIG" in result.error
