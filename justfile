# Quick start: `pip install rust-just && just run`, then `just test`.
# Both make .venv on first use; see `just --list` for the rest.

set positional-arguments

venv := ".venv"
stamp := venv / ".installed"

# The interpreter that makes the virtualenv; `just bootstrap=python3.12 setup`.
bootstrap := "python3"

# Every recipe that uses it depends on `setup`. Just evaluates variables
# before any recipe runs, so a "venv python if it exists, else python3"
# choice would pick python3 on the first `just test` of a fresh clone.
python := venv / "bin/python"

_default:
    @{{ just_executable() }} --justfile {{ justfile() }} --list

# Create .venv and install the project into it, unless it is up to date.
setup:
    #!/bin/sh
    set -eu
    if [ -f {{ stamp }} ] && [ ! pyproject.toml -nt {{ stamp }} ]; then exit 0; fi
    [ -x {{ python }} ] || {{ bootstrap }} -m venv {{ venv }}
    {{ python }} -m pip install --quiet -e '.[dev]'
    touch {{ stamp }}

# Start a registry; with nothing configured, on an embedded Postgres.
run *ARGS: setup
    {{ venv }}/bin/registry serve "$@"

# Run the tests (embedded Postgres unless REGISTRY_TEST_DATABASE_URL is set).
test *ARGS: setup
    {{ python }} -m pytest "$@"

# Check style, formatting and types.
lint: setup
    {{ python }} -m ruff check .
    {{ python }} -m ruff format --check .
    {{ python }} -m mypy

# Fix what ruff can and format the code.
fmt: setup
    {{ python }} -m ruff check --fix .
    {{ python }} -m ruff format .

# Regenerate the Python modules of the API from proto/.
proto: setup
    {{ python }} proto/generate.py

# Check deploy/: the Kubernetes manifests against the API schemas that
# kubernetes-validate bundles (offline), and the Dockerfile with hadolint.
deploy-check: setup
    {{ venv }}/bin/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml
    {{ venv }}/bin/hadolint deploy/Dockerfile

# Measure (not test) the registry under load.
bench *ARGS: setup
    @[ -d bench ] || { echo "just bench: this checkout has no bench/ folder, where the load generator lives" >&2; exit 1; }
    {{ python }} -m bench "$@"
