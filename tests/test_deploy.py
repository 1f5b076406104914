"""The deployment files, checked as far as this machine allows.

No container engine and no cluster run here. So the Kubernetes manifests are
validated against the API schemas that kubernetes-validate bundles (strict:
an unknown field fails), the Dockerfile is linted by hadolint, and both are
held to what a replica really does: its settings, ports, probe paths and
drain grace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from registry.config import Config, env_name

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("**/*.yaml"))
# The oldest Kubernetes still supported upstream when this was written, and
# the newest that kubernetes-validate knows.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str, name: str = "registry") -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name!r} in deploy/kubernetes")


def container() -> dict[str, Any]:
    [registry] = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    return registry  # type: ignore[no-any-return]


def environment() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container()["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates_against_the_api_schema(
    path: Path, version: str
) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_deployment_probes_ports_and_grace_match_the_replica() -> None:
    spec = resource("Deployment")["spec"]
    assert spec["replicas"] >= 3
    registry = container()
    ports = {port["name"]: port["containerPort"] for port in registry["ports"]}
    env = environment()
    assert ports["grpc"] == int(env["REGISTRY_PORT"]["value"])
    assert ports["ops"] == int(env["REGISTRY_OPS_PORT"]["value"])

    liveness = registry["livenessProbe"]["httpGet"]
    readiness = registry["readinessProbe"]["httpGet"]
    assert (liveness["path"], liveness["port"]) == ("/healthz", "ops")
    assert (readiness["path"], readiness["port"]) == ("/readyz", "ops")

    # Kubernetes kills what outlives the grace period: the drain must fit.
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["REGISTRY_DRAIN_GRACE"]["value"]) + 5


def test_deployment_sets_only_real_settings_and_reads_secrets_that_exist() -> None:
    settings = {env_name(field.name) for field in fields(Config)}
    env = environment()
    assert set(env) <= settings, set(env) - settings

    secret = resource("Secret")
    for name in ("REGISTRY_DATABASE_URL", "REGISTRY_AMQP_URL"):
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]


def test_services_and_budget_select_the_deployment_pods() -> None:
    labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in container()["ports"]}
    for name in ("registry", "registry-headless"):
        service = resource("Service", name)["spec"]
        assert service["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in service["ports"]} <= port_names
    budget = resource("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_dockerfile_passes_hadolint_and_matches_the_deployment() -> None:
    dockerfile = DEPLOY / "Dockerfile"
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

    text = dockerfile.read_text()
    [exposed] = re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)
    ports = {port["containerPort"] for port in container()["ports"]}
    assert {int(port) for port in exposed.split()} == ports
    [(user, group)] = re.findall(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
    context = resource("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert int(user) == context["runAsUser"]
    assert int(group) == context["runAsGroup"]
    # The user made in the image has that uid and belongs to that group.
    assert f"groupadd --system --gid {group} registry" in text
    assert re.search(rf"useradd --system --uid {user} --gid {group}\b", text)


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    # The Dockerfile is built with the repository root as its context, where
    # Docker reads .dockerignore from.
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split("\n")
    patterns = {line.strip() for line in ignored if line and not line.startswith("#")}
    assert {".git", ".venv", "**/__pycache__", ".mypy_cache", ".pytest_cache"} <= (
        patterns
    )
    # What the build stage copies stays in.
    for needed in ("pyproject.toml", "README.md", "schema.sql", "registry"):
        assert needed not in patterns
