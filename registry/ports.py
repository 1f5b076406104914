"""Which port each API of a registration gets, as plain logic.

Two modes, chosen per registry:

- local (every service on one host): an API registered with port 0 gets a
  free port from a range (REGISTRY_PORT_RANGE), one no other instance holds
  on that address. An instance that registers again and asks for 0 again
  gets back the port its API held before, if it still may.
- remote (each instance has its own address): an API registered with port 0
  gets the fixed port of its kind (REGISTRY_REMOTE_PORTS, by API name).

In both modes a port the service names itself is kept if no other instance
holds it on that address, and refused otherwise. Who holds what lives in the
database (registry.ports, one row per address and port); this module only
decides, given what is held. The store calls it before the statement that
records the choice, which checks again under the address's lock, and
supplies `is_free`, the check that no other program has the port bound.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import AlreadyExists, InvalidArgument, ResourceExhausted
from .model import Api

__all__ = [
    "DEFAULT_POLICY",
    "Holder",
    "PortMode",
    "PortPolicy",
    "PortRange",
    "address_key",
    "assign",
    "held_error",
    "parse_remote_ports",
]

MAX_PORT = 65535
DEFAULT_RANGE = "20000-29999"
DEFAULT_REMOTE_PORTS = "grpc=8090,http=8080"


class PortMode(enum.StrEnum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class PortRange:
    """The ports from `low` to `high`, both included."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> PortRange:
        low, sep, high = text.strip().partition("-")
        rule = (
            f"use LOW-HIGH with 1 <= LOW <= HIGH <= {MAX_PORT}, as in {DEFAULT_RANGE}"
        )
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError(f"{text!r} is not a port range; {rule}")
        result = cls(int(low), int(high))
        if not 1 <= result.low <= result.high <= MAX_PORT:
            raise ValueError(f"{text!r} is not a port range; {rule}")
        return result

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    def from_offset(self, offset: int) -> Iterator[int]:
        """Every port of the range once, starting `offset` ports in and
        wrapping around."""
        size = len(self)
        for step in range(size):
            yield self.low + (offset + step) % size


def parse_remote_ports(text: str) -> dict[str, int]:
    """'grpc=8090,http=8080' -> {'grpc': 8090, 'http': 8080}."""
    rule = f"use KIND=PORT pairs separated by commas, as in {DEFAULT_REMOTE_PORTS}"
    table: dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        kind, sep, port = item.partition("=")
        kind, port = kind.strip(), port.strip()
        if not sep or not kind or not port.isdigit():
            raise ValueError(f"{item.strip()!r} is not KIND=PORT; {rule}")
        if not 1 <= int(port) <= MAX_PORT:
            raise ValueError(f"{item.strip()!r}: the port must be 1-{MAX_PORT}")
        if kind in table:
            raise ValueError(f"{kind!r} is given twice; {rule}")
        if int(port) in table.values():
            raise ValueError(
                f"{item.strip()!r}: port {port} is already the port of another "
                "kind; two kinds of API cannot share a port"
            )
        table[kind] = int(port)
    return table


@dataclass(frozen=True, slots=True)
class PortPolicy:
    mode: PortMode = PortMode.LOCAL
    range: PortRange = PortRange(20000, 29999)
    remote: Mapping[str, int] = field(
        default_factory=lambda: parse_remote_ports(DEFAULT_REMOTE_PORTS)
    )

    @classmethod
    def parse(cls, mode: str, port_range: str, remote_ports: str) -> PortPolicy:
        """The policy of the settings; ValueError naming the bad setting."""
        try:
            parsed_mode = PortMode(mode.strip().lower())
        except ValueError:
            raise ValueError(
                f"REGISTRY_PORT_MODE: {mode!r} is not a port mode; use local or remote"
            ) from None
        try:
            parsed_range = PortRange.parse(port_range)
        except ValueError as exc:
            raise ValueError(f"REGISTRY_PORT_RANGE: {exc}") from None
        try:
            remote = parse_remote_ports(remote_ports)
        except ValueError as exc:
            raise ValueError(f"REGISTRY_REMOTE_PORTS: {exc}") from None
        return cls(parsed_mode, parsed_range, remote)

    def describe(self) -> str:
        if self.mode is PortMode.LOCAL:
            return f"local ports from {self.range}"
        table = ", ".join(f"{kind}={port}" for kind, port in self.remote.items())
        return f"remote ports by kind ({table or 'none'})"


# The settings' defaults.
DEFAULT_POLICY = PortPolicy()


@dataclass(frozen=True, slots=True)
class Holder:
    """An instance's API that holds a port."""

    name: str
    instance_id: str
    api: str

    def __str__(self) -> str:
        return f"api {self.api!r} of instance {self.instance_id!r} of {self.name!r}"


def address_key(address: str) -> str:
    """The form in which an address holds ports: '::0:1' and '::1' are one
    address, host names are case-insensitive, and `localhost` (with its
    subdomains, RFC 6761) is 127.0.0.1: services on one laptop that name
    their address either way must not be handed the same port."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        name = address.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "127.0.0.1"
    return name


def assign(
    apis: Sequence[Api],
    policy: PortPolicy,
    *,
    address: str,
    held: Mapping[int, Holder],
    previous: Mapping[str, int],
    is_free: Callable[[int], bool] | None = None,
    offset: int = 0,
) -> tuple[Api, ...]:
    """The APIs with every port 0 replaced by an assigned port.

    `held`: the ports other instances hold on `address`. `previous`: the
    ports this instance's APIs held on it, by API name, before this
    registration. `is_free(port)`, where given, says whether no other program
    has the port bound; it is asked only about ports picked from the range.
    The range is searched from `offset` ports in, so that registrations
    spread over it instead of all trying its first port.
    """
    named: dict[int, int] = {}
    for index, api in enumerate(apis):
        if api.port == 0:
            continue
        if api.port in named:
            raise InvalidArgument(
                f"apis[{index}].port: {api.port} is also the port of "
                f"apis[{named[api.port]}]; each api needs a port of its own"
            )
        named[api.port] = index
        _refuse_held(f"apis[{index}].port", api.port, address, held)

    if policy.mode is PortMode.REMOTE:
        return tuple(
            api
            if api.port
            else Api(api.name, _remote_port(i, api, policy, address, held, named))
            for i, api in enumerate(apis)
        )

    taken = set(held) | set(named)
    result: list[Api] = []
    for api in apis:
        port = api.port
        if port == 0:
            port = _local_port(
                api, policy.range, taken, previous, is_free, offset, address
            )
            taken.add(port)
        result.append(Api(api.name, port))
    return tuple(result)


def held_error(field: str, port: int, address: str, holder: Holder) -> AlreadyExists:
    """The refusal of `port`, which `holder` holds on `address`."""
    return AlreadyExists(
        f"{field}: port {port} on {address} is held by {holder}; name another "
        "port, register with port 0 to be given a free one, or deregister "
        "that instance"
    )


def _refuse_held(
    field: str, port: int, address: str, held: Mapping[int, Holder]
) -> None:
    holder = held.get(port)
    if holder is not None:
        raise held_error(field, port, address, holder)


def _remote_port(
    index: int,
    api: Api,
    policy: PortPolicy,
    address: str,
    held: Mapping[int, Holder],
    named: Mapping[int, int],
) -> int:
    port = policy.remote.get(api.name)
    if port is None:
        known = ", ".join(f"{k}={p}" for k, p in policy.remote.items()) or "none"
        raise InvalidArgument(
            f"apis[{index}].port: 0 asks for the fixed port of api {api.name!r}, "
            f"but this registry (remote port mode) has none for that kind "
            f"(known: {known}); name the port, or add {api.name}=PORT to "
            "REGISTRY_REMOTE_PORTS"
        )
    if port in named:
        raise InvalidArgument(
            f"apis[{index}].port: 0 asks for the fixed port of api {api.name!r}, "
            f"{port}, which apis[{named[port]}] names too; each api needs a port "
            "of its own"
        )
    _refuse_held(f"apis[{index}].port", port, address, held)
    return port


def _local_port(
    api: Api,
    port_range: PortRange,
    taken: set[int],
    previous: Mapping[str, int],
    is_free: Callable[[int], bool] | None,
    offset: int,
    address: str,
) -> int:
    # The port this API held before comes back without a bind check: the
    # instance registering again may well be the program still bound to it.
    before = previous.get(api.name)
    if before is not None and before in port_range and before not in taken:
        return before

    bound = 0
    for port in port_range.from_offset(offset):
        if port in taken:
            continue
        if is_free is not None and not is_free(port):
            bound += 1
            continue
        return port
    held = sum(1 for port in taken if port in port_range)
    raise ResourceExhausted(
        f"no free port left in {port_range} on {address} for api {api.name!r}: "
        f"{held} held by registered instances, {bound} bound by other programs; "
        "deregister instances, or widen REGISTRY_PORT_RANGE"
    )
