"""The `registry` command: run a replica, or ask one what is registered.

Exit codes: 0 success; 1 the registry answered with an error or could not be
reached (the reason is one line on stderr); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import purerpc
import trio
from google.protobuf.json_format import MessageToDict

from . import config as configuration
from ._convert import STATUS_FROM_PB
from ._grpc import ServeError
from .app import Replica
from .errors import RegistryError
from .v1 import registry_pb2 as pb
from .v1.registry_grpc import RegistryStub

log = logging.getLogger("registry.cli")

DEFAULT_TARGET = "127.0.0.1:50051"
EXAMPLES = {
    "serve": "registry serve --port 50051 --database-url postgresql://localhost/registry",
    "list": "registry list --status active",
    "resolve": "registry resolve billing --json",
    "watch": "registry watch billing orders --from 1200",
}


class CommandError(Exception):
    """A one-line reason to exit with status 1."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except CommandError as exc:
        print(f"registry {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry",
        description="A service registry: gRPC API over a revision log in Postgres.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, run: Callable[[argparse.Namespace], None]
    ) -> Any:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example: {EXAMPLES[name]}",
        )
        sub.set_defaults(run=run)
        return sub

    serve = command(
        "serve",
        "Run one replica. With no database configured, starts an embedded "
        "Postgres in --data-dir.",
        _serve,
    )
    configuration.add_arguments(serve)

    def client_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--target",
            default=os.environ.get("REGISTRY_TARGET", DEFAULT_TARGET),
            help=f"HOST:PORT of a replica (env REGISTRY_TARGET, "
            f"default {DEFAULT_TARGET})",
        )
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument(
            "--timeout", type=float, default=10.0, help="seconds to wait for an answer"
        )

    listing = command("list", "List registered instances, of any status.", _list)
    listing.add_argument("--name", default="", help="only this service")
    listing.add_argument(
        "--status",
        choices=sorted(s.value for s in STATUS_FROM_PB.values()),
        help="only instances in this status",
    )
    listing.add_argument("--version", default="", help="only this version")
    client_options(listing)

    resolve = command("resolve", "Show the active instances of one service.", _resolve)
    resolve.add_argument("name", help="the service name")
    client_options(resolve)

    watch = command("watch", "Print events as they happen, until interrupted.", _watch)
    watch.add_argument("names", nargs="*", help="services to follow (default: all)")
    watch.add_argument(
        "--from",
        dest="from_revision",
        type=int,
        default=0,
        help="replay the events after this revision first",
    )
    watch.add_argument(
        "--snapshot", action="store_true", help="print the current instances first"
    )
    client_options(watch)
    return parser


# --- serve -------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> None:
    config = configuration.load(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        if config.database_url is not None:
            trio.run(_serve_until_signalled, config, config.database_url)
            return
        from ._embedded import embedded_postgres

        with embedded_postgres(config.data_dir.resolve()) as database_url:
            trio.run(_serve_until_signalled, config, database_url)
    except (ServeError, RegistryError) as exc:
        raise CommandError(str(exc)) from None
    except BaseExceptionGroup as group:
        # A replica that cannot start fails inside its nurseries.
        failed, others = group.split((ServeError, RegistryError))
        if failed is None or others is not None:
            raise
        raise CommandError(str(_first_leaf(failed))) from None


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _serve_until_signalled(
    config: configuration.Config, database_url: str
) -> None:
    replica = Replica(config, database_url)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replica.run)
            async for signum in signals:
                log.info("%s received", signal.Signals(signum).name)
                replica.stop()
                break


# --- client commands ---------------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[str, int]:
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"--target {args.target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@contextmanager
def _client_errors(args: argparse.Namespace) -> Iterator[None]:
    """Turn what a call can fail with into a one-line CommandError."""
    try:
        yield
    except (Exception, BaseExceptionGroup) as raised:
        exc: BaseException = raised
        # purerpc's channel raises from inside a task group.
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = _first_leaf(exc)
        if isinstance(exc, trio.TooSlowError):
            raise CommandError(
                f"no answer from {args.target} within {args.timeout}s"
            ) from None
        if isinstance(exc, purerpc.RpcFailedError):
            raise CommandError(_describe(exc)) from None
        if isinstance(exc, OSError):
            raise CommandError(
                f"cannot reach {args.target}: {exc.strerror or exc}"
            ) from None
        raise


async def _unary(args: argparse.Namespace, method: str, request: Any) -> Any:
    host, port = _target(args)
    with _client_errors(args), trio.fail_after(args.timeout):
        async with purerpc.insecure_channel(host, port) as channel:
            return await getattr(RegistryStub(channel), method)(request)


def _describe(exc: Any) -> str:
    status = exc.status
    return f"{status.status_code.name}: {status.status_message}"


def _list(args: argparse.Namespace) -> None:
    status = f"STATUS_{args.status.upper()}" if args.status else "STATUS_UNSPECIFIED"
    request = pb.ListRequest(name=args.name, status=status, version=args.version)
    response = trio.run(_unary, args, "List", request)
    _print_instances(args, response)


def _resolve(args: argparse.Namespace) -> None:
    response = trio.run(_unary, args, "Resolve", pb.ResolveRequest(name=args.name))
    _print_instances(args, response)


def _print_instances(args: argparse.Namespace, response: Any) -> None:
    if args.json:
        print(json.dumps(_as_dict(response), indent=2))
        return
    rows = [
        (
            i.name,
            i.instance_id,
            _status(i.status),
            i.address,
            " ".join(f"{a.name}:{a.port}" for a in i.apis) or "-",
            i.version or "-",
            str(i.revision),
        )
        for i in response.instances
    ]
    header = ("NAME", "INSTANCE", "STATUS", "ADDRESS", "APIS", "VERSION", "REVISION")
    _print_table([header, *rows])
    print(f"{len(rows)} instance(s) at revision {response.revision}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def _as_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _watch(args: argparse.Namespace) -> None:
    request = pb.WatchRequest(
        names=args.names, from_revision=args.from_revision, snapshot=args.snapshot
    )
    try:
        trio.run(_print_watch, args, request)
    except KeyboardInterrupt:
        return


async def _print_watch(args: argparse.Namespace, request: Any) -> None:
    host, port = _target(args)
    last = request.from_revision
    with _client_errors(args):
        async with purerpc.insecure_channel(host, port) as channel:
            async for response in RegistryStub(channel).Watch(request):
                last = _print_watch_response(args, response) or last
    raise CommandError(
        f"the replica ended the stream (it is shutting down); resume with --from {last}"
    )


def _print_watch_response(args: argparse.Namespace, response: Any) -> int:
    """Print one response; return the revision it brings the stream to."""
    kind = response.WhichOneof("kind")
    if args.json:
        print(json.dumps(_as_dict(response)), flush=True)
    elif kind == "event":
        event = response.event
        instance = event.instance
        when = event.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
        print(
            f"{when}  {event.revision:>8}  {_event_type(event.type):<14}  "
            f"{instance.name}/{instance.instance_id}  {_status(instance.status)}",
            flush=True,
        )
    elif kind == "snapshot":
        instance = response.snapshot
        print(
            f"snapshot  {instance.name}/{instance.instance_id}  "
            f"{_status(instance.status)}",
            flush=True,
        )
    elif kind == "snapshot_end":
        print(
            f"snapshot taken at revision {response.snapshot_end.revision}", flush=True
        )
    revision: int = getattr(response, kind).revision
    return revision


def _status(value: int) -> str:
    return str(pb.Status.Name(value)).removeprefix("STATUS_").lower()


def _event_type(value: int) -> str:
    return str(pb.EventType.Name(value)).removeprefix("EVENT_TYPE_").lower()
