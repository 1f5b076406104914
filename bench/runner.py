"""The bench runner: start every system, measure them round by round, print
the table of ratios and write it to bench/RESULTS.md.

Rounds are interleaved: each round measures every system once, figure by
figure, in an order that rotates from round to round. On a shared, noisy
machine absolute figures drift; figures taken minutes apart in the same
round are what the ratios compare.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import purerpc

from bench import measure, probes
from bench.measure import Sample, Workers
from bench.stats import Spread, ratios
from bench.systems import (
    BenchError,
    Postgres,
    System,
    etcd_binary,
    etcd_version,
    free_port,
    start_empty,
    start_etcd,
    start_registry,
)

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The RESULTS.md section kept from one run to the next.
NOTES_HEADING = "## Notes"

ETCD = "etcd"
ONE = "registry x1"
TWO = "registry x2"
PURERPC = "purerpc"
SHELL = "grpc shell"

FIGURES = ("unary", "watch", "failure", "memory", "probes")
SYSTEM_GROUPS = {
    "etcd": (ETCD,),
    "registry": (ONE, TWO),
    "ceiling": (PURERPC, SHELL),
}


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    # Seconds of load per unary measurement, and its bound in calls per caller.
    duration: float = 5.0
    max_calls: int = 100_000
    warmup: int = 20
    callers: tuple[int, ...] = (1, 16)
    watchers: tuple[int, ...] = (100, 1000)
    # Writes per watch round: p99 over a few writes is that of the slowest.
    writes: int = 100
    idle_streams: int = 10_000
    # Worker processes holding watch streams, and streams per connection.
    watch_processes: int = 4
    streams_per_channel: int = 100
    open_timeout: float = 120.0
    delivery_timeout: float = 10.0
    probe_interval: float = 1.0
    probe_failures: int = 3
    probe_ladder: tuple[int, ...] = (50, 100, 200, 400, 800, 1600, 3200, 6400)
    probe_window: float = 5.0


QUICK = Settings(
    rounds=2,
    duration=1.0,
    warmup=5,
    callers=(1, 4),
    watchers=(10, 50),
    writes=5,
    idle_streams=500,
    watch_processes=2,
    open_timeout=30.0,
    probe_ladder=(25, 50),
    probe_window=2.0,
)


# --- the figures -------------------------------------------------------------


@dataclass
class Figure:
    """One row group of the table: a figure measured on some systems."""

    key: str
    title: str
    unit: str
    digits: int
    # system name -> one sample per round (NaN where a round failed).
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    latencies: bool = False

    def add(self, system: str, sample: Sample) -> None:
        self.samples.setdefault(system, []).append(sample)

    def values(self, system: str) -> list[float]:
        return [sample.value for sample in self.samples.get(system, [])]


@dataclass(frozen=True)
class Ratio:
    title: str
    goal: str
    # Met when the ratio is at most (True) or at least (False) the limit.
    at_most: bool
    limit: float
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    # Divide figures per core of CPU used rather than raw.
    per_core: bool = False


class Results:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.unmeasurable: dict[str, str] = {}

    def figure(self, key: str, title: str, unit: str, digits: int = 0) -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(key, title, unit, digits)
        return self.figures[key]

    def series(self, key: str, system: str, per_core: bool) -> list[float]:
        figure = self.figures.get(key)
        if figure is None:
            return []
        samples = figure.samples.get(system, [])
        if per_core:
            return [s.value / s.cores if s.cores > 0 else math.nan for s in samples]
        return [s.value for s in samples]


def unary_key(shape: str, callers: int) -> str:
    return f"{shape}-{callers}"


def ratio_rows(settings: Settings) -> list[Ratio]:
    most = max(settings.callers)
    rows = [
        Ratio(
            f"register/s, {most} callers: registry x1 / etcd",
            ">= 1.0",
            False,
            1.0,
            (unary_key("register", most), ONE),
            (unary_key("register", most), ETCD),
        ),
        Ratio(
            f"resolve/s, {most} callers: registry x1 / empty purerpc call",
            ">= 0.9",
            False,
            0.9,
            (unary_key("resolve", most), ONE),
            (unary_key("resolve", most), PURERPC),
        ),
        Ratio(
            f"resolve/s, {most} callers: registry x2 / x1",
            ">= 1.8 given the cores",
            False,
            1.8,
            (unary_key("resolve", most), TWO),
            (unary_key("resolve", most), ONE),
        ),
        Ratio(
            f"resolve/s per core used, {most} callers: registry x2 / x1",
            ">= 0.9 (1.8 over 2)",
            False,
            0.9,
            (unary_key("resolve", most), TWO),
            (unary_key("resolve", most), ONE),
            per_core=True,
        ),
    ]
    for count in settings.watchers:
        rows.append(
            Ratio(
                f"watch p99, {count:,} watchers: registry x2 / etcd",
                "<= 1.0",
                True,
                1.0,
                (f"watch-{count}", TWO),
                (f"watch-{count}", ETCD),
            )
        )
    rows += [
        Ratio(
            f"empty call/s, {most} callers: grpc shell / purerpc",
            "(how much the shell costs)",
            False,
            math.nan,
            (unary_key("resolve", most), SHELL),
            (unary_key("resolve", most), PURERPC),
        ),
        Ratio(
            f"empty purerpc call/s / etcd register/s, {most} callers",
            "(the stack's ceiling against etcd)",
            False,
            math.nan,
            (unary_key("resolve", most), PURERPC),
            (unary_key("register", most), ETCD),
        ),
        Ratio(
            f"register/s per core used, {most} callers: registry x1 / etcd",
            "(CPU per registration, inverted)",
            False,
            math.nan,
            (unary_key("register", most), ONE),
            (unary_key("register", most), ETCD),
            per_core=True,
        ),
        Ratio(
            f"register/s, {most} callers: registry x2 / x1",
            "(one database behind both)",
            False,
            math.nan,
            (unary_key("register", most), TWO),
            (unary_key("register", most), ONE),
        ),
    ]
    return rows


# --- running -----------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.results = Results()
        self.systems: dict[str, System] = {}
        self.versions: dict[str, str] = {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "purerpc": purerpc.__version__,
        }
        self.folder = Path(tempfile.mkdtemp(prefix="registry-bench-"))
        self.postgres = Postgres(args.database_url)
        self.probing = True
        self.wanted = {name for group in args.systems for name in SYSTEM_GROUPS[group]}

    # Starting and stopping.

    def start(self) -> None:
        log.info("logs and data of this run: %s", self.folder)
        if self.wanted & {ONE, TWO}:
            self.versions["postgres"] = self.postgres.version()
        if ETCD in self.wanted:
            binary = etcd_binary(install=not self.args.no_install)
            if binary is None:
                self._unmeasurable(
                    ETCD,
                    "no etcd on PATH and Debian's etcd-server could not be installed",
                )
            else:
                self.versions["etcd"] = etcd_version(binary)
                self._start(ETCD, lambda: start_etcd(binary, self.folder))
        if PURERPC in self.wanted:
            self._start(PURERPC, lambda: start_empty("purerpc", self.folder))
        if SHELL in self.wanted:
            self._start(SHELL, lambda: start_empty("shell", self.folder))
        if ONE in self.wanted:
            self._start(ONE, lambda: start_registry(ONE, self.postgres, 1, self.folder))
        if TWO in self.wanted:
            self._start(TWO, lambda: start_registry(TWO, self.postgres, 2, self.folder))
        for name, system in self.systems.items():
            if system.kind != "empty":
                log.info("seeding %s for resolve", name)
                measure.seed_resolve(system)

    def _start(self, name: str, start: Callable[[], System]) -> None:
        log.info("starting %s", name)
        try:
            self.systems[name] = start()
        except BenchError as exc:
            self._unmeasurable(name, str(exc))

    def _unmeasurable(self, name: str, reason: str) -> None:
        log.warning("%s: %s", name, reason)
        self.results.unmeasurable[name] = reason

    def stop(self) -> None:
        for system in self.systems.values():
            system.stop()
        self.postgres.close()

    # Measuring.

    def run(self) -> None:
        settings = self.settings
        workers = Workers(max(max(settings.callers), min(settings.watch_processes, 16)))
        try:
            for round_index in range(settings.rounds):
                log.info("round %d of %d", round_index + 1, settings.rounds)
                self._round(round_index, workers)
        finally:
            workers.close()

    def _order(self, names: Sequence[str], round_index: int) -> list[str]:
        present = [name for name in names if name in self.systems]
        if not present:
            return []
        shift = round_index % len(present)
        return present[shift:] + present[:shift]

    def _round(self, round_index: int, workers: Workers) -> None:
        settings = self.settings
        figures = self.args.figures
        everything = [ETCD, ONE, TWO, PURERPC, SHELL]

        if "unary" in figures:
            most = max(settings.callers)
            for callers in settings.callers:
                for shape in ("register", "resolve"):
                    title = f"{shape}/s, {callers} caller{'s' if callers > 1 else ''}"
                    figure = self.results.figure(unary_key(shape, callers), title, "/s")
                    figure.latencies = True
                    for name in self._order(everything, round_index):
                        system = self.systems[name]
                        if system.kind == "empty" and shape != "resolve":
                            continue
                        if name == TWO and callers != most:
                            continue
                        self._measure(
                            figure,
                            name,
                            functools.partial(
                                measure.unary,
                                workers,
                                system,
                                shape,
                                callers,
                                duration=settings.duration,
                                warmup=settings.warmup,
                                max_calls=settings.max_calls,
                            ),
                        )

        if "watch" in figures:
            for count in settings.watchers:
                figure = self.results.figure(
                    f"watch-{count}",
                    f"watch p99, {count:,} watchers (write to receipt)",
                    " ms",
                    1,
                )
                figure.latencies = True
                for name in self._order([TWO, ETCD], round_index):
                    system = self.systems[name]
                    self._measure(
                        figure,
                        name,
                        functools.partial(
                            measure.watch,
                            workers,
                            system,
                            count,
                            writes=settings.writes,
                            warmup=2,
                            processes=settings.watch_processes,
                            per_channel=settings.streams_per_channel,
                            open_timeout=settings.open_timeout,
                            delivery_timeout=settings.delivery_timeout,
                        ),
                        scale=1000,
                    )

        if "failure" in figures and ONE in self.systems and self.probing:
            figure = self.results.figure(
                "failure", "failure detection (stops answering to INACTIVE)", " s", 2
            )
            self._measure(
                figure,
                ONE,
                lambda: probes.failure_detection(
                    self.systems[ONE],
                    round_index,
                    interval=settings.probe_interval,
                    failures=settings.probe_failures,
                ),
            )

        if "memory" in figures:
            figure = self.results.figure(
                "memory",
                f"resident memory holding {settings.idle_streams:,} idle watch streams",
                " MiB",
            )
            if ONE in self.systems:
                self._measure(
                    figure,
                    ONE,
                    lambda: self._fresh_replica_memory(workers),
                    scale=2**-20,
                )
            if ETCD in self.systems:
                self._measure(
                    figure,
                    ETCD,
                    lambda: measure.idle_streams(
                        workers,
                        self.systems[ETCD],
                        settings.idle_streams,
                        processes=settings.watch_processes,
                        per_channel=settings.streams_per_channel,
                        open_timeout=settings.open_timeout,
                    ),
                    scale=2**-20,
                )

        if "probes" in figures and ONE in self.systems and self.probing:
            figure = self.results.figure(
                "probes", "HTTP targets one replica probes per interval", ""
            )
            self._measure(figure, ONE, self._probe_capacity)

    def _measure(
        self,
        figure: Figure,
        name: str,
        run: Callable[[], Sample],
        scale: float = 1.0,
    ) -> None:
        try:
            sample = run()
        except probes.NotMeasurable as exc:
            log.warning("%s on %s: not measurable: %s", figure.title, name, exc)
            self.probing = False
            self.results.unmeasurable[figure.key] = str(exc)
            return
        except BenchError as exc:
            log.warning("%s on %s failed: %s", figure.title, name, exc)
            sample = Sample(math.nan, note=str(exc).splitlines()[0])
        except grpc.RpcError as exc:
            log.warning("%s on %s failed: %s", figure.title, name, exc)
            sample = Sample(
                math.nan, note=f"a call failed: {exc.code()}: {exc.details()}"
            )
        sample = replace(
            sample,
            value=sample.value * scale,
            p50=sample.p50 * (1000 if figure.latencies else 1),
            p99=sample.p99 * (1000 if figure.latencies else 1),
        )
        figure.add(name, sample)
        detail = ""
        if figure.latencies:
            detail = f" (p50 {sample.p50:.2f} ms, p99 {sample.p99:.2f} ms)"
        log.info(
            "%s, %s: %s%s%s%s",
            figure.title,
            name,
            f"{sample.value:,.{figure.digits}f}",
            figure.unit,
            detail,
            f"; {sample.note}" if sample.note else "",
        )

    def _fresh_replica_memory(self, workers: Workers) -> Sample:
        # A replica that has served no load holds only what the streams cost.
        settings = self.settings
        system = start_registry("memory", self.postgres, 1, self.folder)
        try:
            return measure.idle_streams(
                workers,
                system,
                settings.idle_streams,
                processes=settings.watch_processes,
                per_channel=settings.streams_per_channel,
                open_timeout=settings.open_timeout,
            )
        finally:
            system.stop()

    def _probe_capacity(self) -> Sample:
        settings = self.settings
        port = free_port()
        targets = probes.Targets(max(settings.probe_ladder), port)
        try:
            system = start_registry("probes", self.postgres, 1, self.folder)
            try:
                return probes.probe_capacity(
                    system,
                    targets,
                    port,
                    interval=settings.probe_interval,
                    ladder=settings.probe_ladder,
                    window=settings.probe_window,
                )
            finally:
                system.stop()
        finally:
            targets.close()


# --- the report --------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
        )

    return [line(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [
        line(row) for row in rows
    ]


def ratio_table(results: Results, settings: Settings) -> list[str]:
    rows = []
    for ratio in ratio_rows(settings):
        per_round = ratios(
            results.series(*ratio.numerator, ratio.per_core),
            results.series(*ratio.denominator, ratio.per_core),
        )
        spread = Spread.of(per_round)
        if spread is None:
            measured, verdict = "not measured", ""
        else:
            measured = spread.format("x", 2)
            verdict = ""
            if not math.isnan(ratio.limit):
                met = (
                    spread.median <= ratio.limit
                    if ratio.at_most
                    else spread.median >= ratio.limit
                )
                verdict = "yes" if met else "NO"
        rows.append([ratio.title, measured, ratio.goal, verdict])

    # The figures whose goal is absolute.
    absolute = [
        (
            "failure",
            ONE,
            "failure detection, seconds",
            f"<= {settings.probe_interval * settings.probe_failures + 1:g} s "
            f"(interval {settings.probe_interval:g} s x {settings.probe_failures} + 1)",
            settings.probe_interval * settings.probe_failures + 1,
            " s",
            2,
        ),
        (
            "memory",
            ONE,
            f"{settings.idle_streams:,} idle watch streams, one replica, RSS",
            "< 1,024 MiB",
            1024.0,
            " MiB",
            0,
        ),
    ]
    for key, system, title, goal, limit, unit, digits in absolute:
        spread = Spread.of(results.series(key, system, False))
        if spread is None:
            reason = results.unmeasurable.get(key, "")
            rows.append(
                [title, "not measurable yet" if reason else "not measured", goal, ""]
            )
            continue
        met = spread.median <= limit if key == "failure" else spread.median < limit
        rows.append([title, spread.format(unit, digits), goal, "yes" if met else "NO"])
    spread = Spread.of(results.series("probes", ONE, False))
    rows.append(
        [
            f"HTTP targets probed per {settings.probe_interval:g} s interval, "
            "one replica, under one core",
            spread.format()
            if spread
            else (
                "not measurable yet"
                if "probes" in results.unmeasurable
                else "not measured"
            ),
            "(a figure, no goal)",
            "",
        ]
    )
    return _table(
        ["ratio (same round, median and range)", "measured", "goal", "met"], rows
    )


def figure_table(results: Results) -> list[str]:
    rows = []
    for figure in results.figures.values():
        for system, samples in figure.samples.items():
            spread = Spread.of([s.value for s in samples])
            value = spread.format(figure.unit, figure.digits) if spread else "failed"
            p50 = Spread.of([s.p50 for s in samples])
            p99 = Spread.of([s.p99 for s in samples])
            cores = Spread.of([s.cores for s in samples])
            # What one call cost the system in CPU: how it would fare on
            # cores of its own, whatever else shared these.
            per_call = (
                Spread.of([s.cores / s.value * 1000 for s in samples if s.value > 0])
                if figure.unit == "/s"
                else None
            )
            note = _median_note(samples, spread.median if spread else math.nan)
            rows.append(
                [
                    figure.title,
                    system,
                    value,
                    p50.format(" ms", 2) if p50 and figure.latencies else "",
                    p99.format(" ms", 2) if p99 and figure.latencies else "",
                    cores.format("", 2) if cores else "",
                    per_call.format(" ms", 2) if per_call else "",
                    note,
                ]
            )
    return _table(
        [
            "figure",
            "system",
            "median (min-max)",
            "p50",
            "p99",
            "cores",
            "CPU per call",
            "note",
        ],
        rows,
    )


def _median_note(samples: Sequence[Sample], median: float) -> str:
    """The note of the round closest to the median, else the first note."""
    noted = [s for s in samples if s.note]
    if not noted:
        return ""
    measured = [s for s in noted if math.isfinite(s.value)]
    if not measured or math.isnan(median):
        return noted[0].note
    return min(measured, key=lambda s: abs(s.value - median)).note


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    )
    commit = done.stdout.strip() or "unknown"
    return commit + (" with uncommitted changes" if dirty.stdout.strip() else "")


def report(
    bench: Bench, command: str, load_before: str, load_after: str, seconds: float
) -> str:
    settings = bench.settings
    lines = [
        "# Benchmark results",
        "",
        "Written by the bench runner (`just bench`, `python -m bench`); everything",
        f'above "{NOTES_HEADING}" is replaced at each run.',
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, took {seconds / 60:.1f} min;"
        f" commit {_commit()}",
        f"- machine: {os.cpu_count()} cores; load average (1, 5, 15 min) "
        f"{load_before} before, {load_after} after",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in bench.versions.items()),
        f"- {settings.rounds} rounds, interleaved; {settings.duration:g} s of load per "
        f"unary figure; callers {', '.join(map(str, settings.callers))}, each its own "
        "process and connection (grpcio)",
        "",
        "## Ratios",
        "",
        *ratio_table(bench.results, settings),
        "",
        "## Figures",
        "",
        "Median over the rounds, (lowest-highest) after it. cores: CPU the "
        "system used during the measurement (the registry's replicas and their "
        "Postgres backends; etcd; the empty server). CPU per call: those "
        "cores over the calls per second, the CPU time one call cost the system.",
        "",
        *figure_table(bench.results),
    ]
    if bench.results.unmeasurable:
        lines += ["", "## Not measured", ""]
        lines += [
            f"- {key}: {reason}" for key, reason in bench.results.unmeasurable.items()
        ]
    return "\n".join(lines) + "\n"


def write_results(path: Path, text: str) -> None:
    """Write `text`, keeping the Notes section of the file already there."""
    notes = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        at = old.find("\n" + NOTES_HEADING)
        if at >= 0:
            notes = old[at:]
    path.write_text(text + notes, encoding="utf-8")


# --- the command -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the registry beside etcd and its own ceiling.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, 2 rounds")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --quick 2)")
    parser.add_argument(
        "--systems",
        type=lambda text: text.split(","),
        default=list(SYSTEM_GROUPS),
        help=f"comma-separated, of {', '.join(SYSTEM_GROUPS)} (default all)",
    )
    parser.add_argument(
        "--figures",
        type=lambda text: text.split(","),
        default=list(FIGURES),
        help=f"comma-separated, of {', '.join(FIGURES)} (default all)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("REGISTRY_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="Postgres superuser DSN; each run creates and drops its databases "
        "(env REGISTRY_BENCH_DATABASE_URL)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="where to write the results"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install etcd-server when etcd is not on PATH",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for group in args.systems:
        if group not in SYSTEM_GROUPS:
            raise SystemExit(f"bench: --systems: unknown {group!r}")
    for figure in args.figures:
        if figure not in FIGURES:
            raise SystemExit(f"bench: --figures: unknown {figure!r}")
    settings = QUICK if args.quick else Settings()
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )

    command = shlex.join(["python", "-m", "bench", *argv])
    load_before = _load_average()
    began = time.monotonic()
    bench = Bench(settings, args)
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
    text = report(
        bench, command, load_before, _load_average(), time.monotonic() - began
    )
    print(text)
    write_results(args.output, text)
    log.info("written to %s", args.output)
