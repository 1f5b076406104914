"""The `registry` command: run a replica, or ask one what is registered.

Exit codes: 0 success; 1 the registry answered with an error or could not be
reached; 2 bad usage (a malformed flag, a missing argument); 3 the registry
answered that nothing matches (no such name or instance, or no active
instance for resolve). Apart from 0, the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC
from typing import Any, TypeVar

import trio
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from . import client, logs
from . import config as configuration
from ._convert import STATUS_FROM_PB
from ._grpc import ServeError
from .errors import RegistryError
from .health_api import MAX_HISTORY
from .v1 import registry_pb2 as pb

log = logging.getLogger("registry.cli")

DEFAULT_TARGET = "127.0.0.1:50051"
EXAMPLES = {
    "serve": "registry serve --port 50051 --database-url postgresql://localhost/registry",
    "list": "registry list --status active",
    "resolve": "registry resolve billing --json",
    "watch": "registry watch billing orders --from 1200",
    "register": "registry register billing --address 10.0.3.17 --api grpc=0 --ttl 10",
    "deregister": 'registry deregister billing b-1 --token "$TOKEN"',
    "history": "registry history billing --instance b-1 --limit 50",
}


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING_MATCHES = 3


class CommandError(Exception):
    """A one-line reason to exit with `status`."""

    def __init__(self, reason: str, status: int = EXIT_FAILED) -> None:
        super().__init__(reason)
        self.status = status


class UsageError(Exception):
    """Bad usage that argparse cannot see by itself: exit 2, as it does."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as exc:
        args.command_parser.error(str(exc))
    except CommandError as exc:
        print(f"registry {args.command}: {exc}", file=sys.stderr)
        sys.exit(exc.status)
    except KeyboardInterrupt:
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry",
        description="A service registry: gRPC API over a revision log in Postgres.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        summary: str,
        run: Callable[[argparse.Namespace], None],
        details: str = "",
    ) -> Any:
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary} {details}".strip(),
            epilog=f"example: {EXAMPLES[name]}",
        )
        sub.set_defaults(run=run, command_parser=sub)
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
            type=_endpoints,
            default=os.environ.get("REGISTRY_TARGET", DEFAULT_TARGET),
            help="HOST:PORT of a replica, or several separated by commas, tried "
            f"in order (env REGISTRY_TARGET, default {DEFAULT_TARGET})",
        )
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=10.0,
            help="seconds to wait for an answer",
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

    watch = command(
        "watch",
        "Print events as they happen, until interrupted.",
        _watch,
        "Each line has the time, revision, type, instance and status. When its "
        "replica goes away, it resumes on the next --target from the last "
        "revision printed, missing nothing and repeating nothing.",
    )
    watch.add_argument("names", nargs="*", help="services to follow (default: all)")
    watch.add_argument(
        "--from",
        dest="from_revision",
        type=_revision,
        default=0,
        help="replay the events after this revision first (default 0: only "
        "what happens from now on)",
    )
    watch.add_argument(
        "--snapshot", action="store_true", help="print the current instances first"
    )
    client_options(watch)

    register = command(
        "register",
        "Register an instance and hold the registration while running.",
        _register,
        "Prints the instance id, its ports and its token, sends heartbeats if "
        "it has a TTL check, and on SIGINT or SIGTERM drains and deregisters "
        "it. The fields come from flags, or from a JSON or TOML file in the "
        "API's JSON form (the keys of RegisterRequest: name, address, apis, "
        "check...), which flags override.",
    )
    register.add_argument("name", nargs="?", default="", help="the service name")
    register.add_argument(
        "--file", help="a RegisterRequest as JSON, or TOML if the name ends in .toml"
    )
    register.add_argument("--instance-id", help="default: a random one")
    register.add_argument("--address", help="host name or IP address of the instance")
    register.add_argument("--version", help="version of the service")
    register.add_argument("--description", help="a line about the instance")
    register.add_argument(
        "--api",
        action="append",
        type=_api,
        metavar="NAME=PORT",
        help="an API and its port (0: the registry assigns one); repeatable",
    )
    register.add_argument(
        "--broker",
        action="append",
        type=_broker,
        metavar="EXCHANGE:ROUTING_KEY[:queue|topic]",
        help="a broker binding (type queue by default); repeatable",
    )
    register.add_argument(
        "--metadata",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="repeatable",
    )
    register.add_argument(
        "--follow",
        action="append",
        metavar="NAME",
        help="a service whose events the instance wants on a queue; repeatable",
    )
    register.add_argument(
        "--ttl",
        type=_seconds,
        metavar="SECONDS",
        help="a TTL health check of this many seconds, kept alive by heartbeats",
    )
    client_options(register)

    deregister = command(
        "deregister",
        "Remove an instance.",
        _deregister,
        "Needs the token its Register returned (--token or REGISTRY_TOKEN).",
    )
    deregister.add_argument("name", help="the service name")
    deregister.add_argument("instance_id", help="the instance id")
    deregister.add_argument(
        "--token",
        default=os.environ.get("REGISTRY_TOKEN", ""),
        help="the instance token (env REGISTRY_TOKEN)",
    )
    client_options(deregister)

    history = command(
        "history",
        "Show the status transitions of a service, newest first.",
        _history,
        "Each line has the time, revision, instance, the statuses before and "
        "after, and why: the probe's result, or the service's own request.",
    )
    history.add_argument("name", help="the service name")
    history.add_argument("--instance", default="", help="only this instance id")
    history.add_argument(
        "--limit",
        type=_limit,
        default=0,
        help=f"how many, up to {MAX_HISTORY} (default: the server's, 20)",
    )
    client_options(history)
    return parser


# Flag values: a malformed one is bad usage, reported by argparse (exit 2).


def _endpoints(text: str) -> list[str]:
    try:
        return client.parse_endpoints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _revision(text: str) -> int:
    try:
        revision = int(text)
    except ValueError:
        revision = -1
    if not 0 <= revision < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a revision (0 or more)")
    return revision


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = -1
    if not 0 <= limit <= MAX_HISTORY:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a count from 1 to {MAX_HISTORY} (or 0: the default)"
        )
    return limit


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _api(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PORT")
    return name, int(port)


def _broker(text: str) -> tuple[str, str, str]:
    exchange, _, rest = text.partition(":")
    routing_key, _, kind = rest.partition(":")
    if kind not in ("", "queue", "topic"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the type is queue or topic, not {kind!r}"
        )
    return exchange, routing_key, f"BROKER_TYPE_{(kind or 'queue').upper()}"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


# --- serve -------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> None:
    config = configuration.load(args)
    try:
        logs.configure(config.log_level, config.log_format)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
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
    # Imported here: the client commands start faster without it.
    from .app import Replica

    # What is loaded by now (modules, protobuf descriptors: some 60,000
    # objects) lives as long as the process. Out of the collector's sight, a
    # full collection scans only what serving creates, and its pause, which
    # lands on the calls in flight, loses the tens of milliseconds they cost.
    gc.collect()
    gc.freeze()

    replica = Replica(config, database_url)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replica.run)
            async for signum in signals:
                log.info("%s received", signal.Signals(signum).name)
                replica.stop()
                break


# --- client commands ---------------------------------------------------------


T = TypeVar("T")


def _run_client(
    args: argparse.Namespace, work: Callable[[client.Client], Awaitable[T]]
) -> T:
    """Run `work` with a client of --target; a failed call exits with its
    one-line reason."""

    async def run() -> T:
        async with client.connect(args.target, timeout=args.timeout) as connected:
            return await work(connected)

    try:
        return trio.run(run)
    except (client.NotFound, client.NoActiveInstance) as exc:
        raise CommandError(str(exc), EXIT_NOTHING_MATCHES) from None
    except client.ClientError as exc:
        raise CommandError(str(exc)) from None


def _list(args: argparse.Namespace) -> None:
    response = _run_client(
        args,
        lambda c: c.list(
            name=args.name, status=args.status or "", version=args.version
        ),
    )
    _print_instances(args, response)
    if not response.instances:
        raise CommandError("no instance matches", EXIT_NOTHING_MATCHES)


def _resolve(args: argparse.Namespace) -> None:
    response = _run_client(args, lambda c: c.resolve(args.name))
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
    async def follow(connected: client.Client) -> None:
        async with connected.watch(
            args.names, from_revision=args.from_revision, snapshot=args.snapshot
        ) as events:
            async for item in events:
                _print_watch_item(args, item)

    try:
        _run_client(args, follow)
    except KeyboardInterrupt:
        return


def _print_watch_item(args: argparse.Namespace, item: Any) -> None:
    if isinstance(item, client.Snapshot):
        for instance in item.instances:
            if args.json:
                _print_json(pb.WatchResponse(snapshot=instance))
            else:
                print(
                    f"snapshot  {instance.name}/{instance.instance_id}  "
                    f"{_status(instance.status)}"
                )
        if isinstance(item, client.Resynced):
            if args.json:
                print(json.dumps({"resynced": {"revision": str(item.revision)}}))
            else:
                print(
                    "the events missed were compacted away: resynced from a "
                    f"snapshot at revision {item.revision}"
                )
        elif args.json:
            _print_json(
                pb.WatchResponse(snapshot_end=pb.SnapshotEnd(revision=item.revision))
            )
        else:
            print(f"snapshot taken at revision {item.revision}")
    elif args.json:
        _print_json(pb.WatchResponse(event=item))
    else:
        instance = item.instance
        when = item.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
        print(
            f"{when}  {item.revision:>8}  {_event_type(item.type):<14}  "
            f"{instance.name}/{instance.instance_id}  {_status(instance.status)}"
        )
    sys.stdout.flush()


def _print_json(message: Any) -> None:
    print(json.dumps(_as_dict(message)))


def _register(args: argparse.Namespace) -> None:
    request = _registration(args)

    async def hold(connected: client.Client) -> client.Registration:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with connected.registered(request) as me:
                _print_registered(args, me)
                async for _ in signals:
                    break
        return me

    me = _run_client(args, hold)
    if me.leave_error is not None:
        raise CommandError(me.leave_error)
    who = f"{me.name}/{me.instance_id}"
    if args.json:
        left: dict[str, Any] = {"name": me.name, "instance_id": me.instance_id}
        if me.deregistered_revision is not None:
            left["revision"] = str(me.deregistered_revision)
        print(json.dumps({"deregistered": left}))
    elif me.deregistered_revision is None:
        print(f"{who} was already gone")
    else:
        print(f"deregistered {who} at revision {me.deregistered_revision}")


def _print_registered(args: argparse.Namespace, me: client.Registration) -> None:
    if args.json:
        print(json.dumps(_as_dict(me.response)), flush=True)
        return
    ports = " ".join(f"{name}={port}" for name, port in me.ports.items())
    print(
        f"registered {me.name}/{me.instance_id} generation {me.generation} "
        f"at revision {me.revision} ({_status(me.instance.status)})"
    )
    _print_table(
        [
            ("instance", me.instance_id),
            ("token", me.token),
            ("ports", ports or "-"),
            ("queues", " ".join(me.queues) or "-"),
        ]
    )
    print("holding it until SIGINT or SIGTERM, then draining and deregistering")
    sys.stdout.flush()


def _registration(args: argparse.Namespace) -> Any:
    """The RegisterRequest of --file, overridden by the flags."""
    request = pb.RegisterRequest()
    if args.file:
        try:
            with open(args.file, "rb") as file:
                if args.file.endswith(".toml"):
                    fields = tomllib.load(file)
                else:
                    fields = json.load(file)
            ParseDict(fields, request)
        except OSError as exc:
            raise CommandError(f"--file {args.file}: {exc.strerror}") from None
        except (ValueError, ParseError) as exc:
            # tomllib and json errors are ValueErrors.
            raise CommandError(f"--file {args.file}: {exc}") from None

    for field in ("name", "instance_id", "address", "version", "description"):
        value = getattr(args, field)
        if value:
            setattr(request, field, value)
    if args.api:
        del request.apis[:]
        for name, port in args.api:
            request.apis.add(name=name, port=port)
    if args.broker:
        del request.brokers[:]
        for exchange, routing_key, kind in args.broker:
            request.brokers.add(exchange=exchange, routing_key=routing_key, type=kind)
    if args.metadata:
        request.metadata.clear()
        request.metadata.update(dict(args.metadata))
    if args.follow:
        del request.follows[:]
        request.follows.extend(args.follow)
    if args.ttl is not None:
        check = pb.HealthCheck()
        check.ttl.ttl.FromNanoseconds(round(args.ttl * 1e9))
        request.check.CopyFrom(check)
    if not request.name:
        raise UsageError("which service? give NAME, or a --file with a name")
    return request


def _deregister(args: argparse.Namespace) -> None:
    if not args.token:
        raise UsageError("the instance token is needed: --token or REGISTRY_TOKEN")
    revision = _run_client(
        args, lambda c: c.deregister(args.name, args.instance_id, args.token)
    )
    if args.json:
        _print_json(pb.DeregisterResponse(revision=revision))
    else:
        print(f"deregistered {args.name}/{args.instance_id} at revision {revision}")


def _history(args: argparse.Namespace) -> None:
    response = _run_client(
        args,
        lambda c: c.history(args.name, instance_id=args.instance, limit=args.limit),
    )
    if args.json:
        print(json.dumps(_as_dict(response), indent=2))
    else:
        _print_transitions(response)
    if not response.transitions:
        whose = f"{args.name}/{args.instance}" if args.instance else repr(args.name)
        raise CommandError(f"no status transition of {whose}", EXIT_NOTHING_MATCHES)


def _print_transitions(response: Any) -> None:
    rows = [
        (
            t.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds"),
            str(t.revision),
            t.instance_id,
            _status(t.from_status),
            _status(t.to_status),
            _reason(t),
        )
        for t in response.transitions
    ]
    header = ("TIME", "REVISION", "INSTANCE", "FROM", "TO", "WHY")
    _print_table([header, *rows])
    print(f"{len(rows)} transition(s)")


def _reason(transition: Any) -> str:
    if not transition.HasField("probe"):
        return "asked by the service"
    probe = transition.probe
    code = f" ({probe.code})" if probe.code else ""
    if probe.healthy:
        return f"probe healthy{code}"
    return f"probe failed{code}: {probe.error or 'no detail'}"


def _status(value: int) -> str:
    return str(pb.Status.Name(value)).removeprefix("STATUS_").lower()


def _event_type(value: int) -> str:
    return str(pb.EventType.Name(value)).removeprefix("EVENT_TYPE_").lower()
