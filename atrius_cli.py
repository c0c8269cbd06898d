"""The thin ``atrius`` entry module: parses the command line and dispatches to agent/ or broker/.

Exit codes: 0 ok, 1 runtime error, 2 usage or config error, 3 lock held by someone else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.coordinator import RetentionPolicy

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


class UsageError(Exception):
    """A command-line value that cannot be used (exit code 2)."""

log = logging.getLogger("atrius")


ONE_SHOT = {"versions", "restore", "lock", "unlock", "status", "init"}
"""Commands that answer and exit: their stderr is one readable line per problem, not a log."""


def _setup_logging(verbose: bool, log_file: str | None, one_shot: bool = False) -> None:
    fmt = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
    console = logging.StreamHandler(sys.stderr)
    if one_shot and not verbose:
        console.setFormatter(logging.Formatter("atrius: %(message)s"))
        console.setLevel(logging.WARNING)
        logging.getLogger("atrius.mqtt").setLevel(logging.ERROR)  # the command reports the outcome itself
    else:
        console.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True)
    if not verbose:
        for noisy in ("amqtt", "transitions", "watchdog"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def run_until_signal(make: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``make(stop)`` on a fresh loop; SIGINT/SIGTERM set ``stop`` for a clean shutdown."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await make(stop)

    asyncio.run(main())


def _cmd_broker(args: argparse.Namespace) -> int:
    from broker.embedded import main_broker

    return main_broker(args.host, args.port)


def _cmd_hub(args: argparse.Namespace) -> int:
    from broker.embedded import BrokerStartError
    from broker.hub import serve_hub

    data = Path(args.data).expanduser().absolute()
    try:
        run_until_signal(lambda stop: serve_hub(args.host, args.port, data, stop, _retention(args)))
    except BrokerStartError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from broker.coordinator import Coordinator
    from schemas.mqtt import BrokerUrl, BrokerUrlError

    try:
        url = BrokerUrl.parse(args.broker)
    except BrokerUrlError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    coord = Coordinator(url, Path(args.data).expanduser().absolute(), username=args.username,
                        password=args.password, ca_file=args.ca_file, retention=_retention(args))
    run_until_signal(coord.run)
    return EXIT_OK


def _cmd_agent(args: argparse.Namespace) -> int:
    from agent.cli import main_agent

    return main_agent(args.config, tui=args.tui, run=run_until_signal)


def _cmd_tui(args: argparse.Namespace) -> int:
    from agent.cli import main_tui

    return main_tui(args.config, run=run_until_signal)


def _cmd_versions(args: argparse.Namespace) -> int:
    from agent.cli import main_command
    from agent.commands import cmd_versions

    return main_command(args.config, lambda cfg: cmd_versions(cfg, args.file_id, as_json=args.json))


def _cmd_restore(args: argparse.Namespace) -> int:
    from agent.cli import main_command
    from agent.commands import cmd_restore

    return main_command(args.config, lambda cfg: cmd_restore(cfg, args.file_id, args.version))


def _cmd_lock(args: argparse.Namespace) -> int:
    from agent.cli import main_command
    from agent.commands import cmd_lock

    return main_command(args.config, lambda cfg: cmd_lock(cfg, args.file_id, ttl=args.ttl, note=args.note))


def _cmd_unlock(args: argparse.Namespace) -> int:
    from agent.cli import main_command
    from agent.commands import cmd_unlock

    return main_command(args.config, lambda cfg: cmd_unlock(cfg, args.file_id, force=args.force))


def _cmd_status(args: argparse.Namespace) -> int:
    from agent.cli import main_command
    from agent.status import cmd_status

    return main_command(args.config, lambda cfg: cmd_status(cfg, as_json=args.json))


def _cmd_init(args: argparse.Namespace) -> int:
    from agent.init import main_init

    return main_init(args.output, broker=args.broker, space=args.space, device=args.device, force=args.force)


def _duration(text: str) -> float:
    from agent.commands import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _retention(args: argparse.Namespace) -> RetentionPolicy:
    from broker.coordinator import RetentionPolicy

    try:
        return RetentionPolicy.parse(args.keep_versions or [], args.keep_days or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import main_demo

    return main_demo(forever=args.forever, size=args.size, screenshot=args.screenshot)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {value}")
    return value


EXIT_CODES = "exit codes: 0 ok, 1 runtime error, 2 usage or config error"
ONE_SHOT_EXIT = EXIT_CODES + " (1 also: no broker or coordinator within 5 s, unknown file)"


def _epilog(*lines: str) -> str:
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from agent import __version__

    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="atrius",
        description="Real-time file sync for game teams over MQTT.",
        epilog=_epilog(
            "example: atrius hub --data .atrius-hub            (on the machine that keeps the history)",
            "example: atrius init --broker mqtt://hub-host:1883 (on each device, then edit agent.yaml)",
            "example: atrius agent --config agent.yaml",
            "",
            "Global options go before the command (atrius -v status --config agent.yaml).",
            "Run atrius COMMAND --help for the options of one command.",
            EXIT_CODES + ", 3 lock held by someone else",
        ),
        formatter_class=raw,
    )
    p.add_argument("--version", action="version", version=f"atrius {__version__}",
                   help="print 'atrius VERSION' and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and a traceback with unexpected errors (default: info logging, "
                        "errors as one line)")
    p.add_argument("--log-file", metavar="FILE",
                   help="also write the log to this file, appending (default: stderr only)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def listen_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (default 127.0.0.1)")
        sp.add_argument("--port", type=_port, default=1883, help="port to listen on (default 1883)")

    def retention_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--keep-versions", action="append", metavar="[SPACE=]N",
                        help="keep the content of the newest N versions per file (default: all); "
                             "SPACE=N sets it for one space; repeatable")
        sp.add_argument("--keep-days", action="append", metavar="[SPACE=]D",
                        help="keep the content of versions younger than D days (default: all); "
                             "SPACE=D sets it for one space; repeatable")

    def config_arg(sp: argparse.ArgumentParser, what: str = "device, space and broker") -> None:
        sp.add_argument("--config", required=True, metavar="FILE", help=f"agent YAML file ({what}); required")

    def file_id_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file_id", metavar="FILE_ID",
                        help="logical file id, or a local path the config maps to one (a listed file, "
                             "or any path inside a synced folder)")

    sp = sub.add_parser("hub", help="embedded MQTT broker + coordinator in one process",
                        description="Run an embedded MQTT broker and the coordinator (history, catch-up, "
                                    "locks) in one process until Ctrl-C / SIGTERM. Configured by flags only.",
                        epilog=_epilog("example: atrius hub --host 0.0.0.0 --port 1883 --data ~/atrius-hub",
                                       "example: atrius hub --keep-versions 100 --keep-versions big-game=20 "
                                       "--keep-days big-game=14",
                                       EXIT_CODES + " (1 also: cannot listen on the port)"),
                        formatter_class=raw)
    listen_args(sp)
    sp.add_argument("--data", default=".atrius-hub", metavar="DIR",
                    help="coordinator data dir: version history and chunks (default .atrius-hub)")
    retention_args(sp)
    sp.set_defaults(func=_cmd_hub)

    sp = sub.add_parser("broker", help="embedded MQTT broker only (amqtt)",
                        description="Run the embedded MQTT 3.1.1 broker (amqtt) alone, without the coordinator, "
                                    "until Ctrl-C / SIGTERM.",
                        epilog=_epilog("example: atrius broker --host 0.0.0.0 --port 1883",
                                       EXIT_CODES + " (1 also: cannot listen on the port)"),
                        formatter_class=raw)
    listen_args(sp)
    sp.set_defaults(func=_cmd_broker)

    sp = sub.add_parser("coordinator", help="coordinator against any MQTT 3.1.1 broker (e.g. Mosquitto)",
                        description="Run the coordinator (history, catch-up, locks) as a client of an existing "
                                    "MQTT 3.1.1 broker until Ctrl-C / SIGTERM. Configured by flags only.",
                        epilog=_epilog("example: atrius coordinator --broker mqtt://127.0.0.1:1883 --data ~/atrius-hub",
                                       "example: atrius coordinator --broker mqtts://mq.studio.lan --ca-file ca.pem "
                                       "--username coord --password secret",
                                       EXIT_CODES),
                        formatter_class=raw)
    sp.add_argument("--broker", required=True, metavar="URL",
                    help="broker URL, mqtt://host[:port] (default port 1883) or mqtts://host[:port] "
                         "(TLS, default port 8883); required")
    sp.add_argument("--data", default=".atrius-hub", metavar="DIR",
                    help="data dir: version history and chunks (default .atrius-hub)")
    sp.add_argument("--username", metavar="U", help="MQTT user name (default: none)")
    sp.add_argument("--password", metavar="P", help="MQTT password (default: none)")
    sp.add_argument("--ca-file", metavar="F", help="CA bundle for mqtts:// (default: the system CAs)")
    retention_args(sp)
    sp.set_defaults(func=_cmd_coordinator)

    sp = sub.add_parser("versions", help="list every version of a file, newest first",
                        description="List every version of a file the coordinator recorded, newest first.",
                        epilog=_epilog("example: atrius versions art/hero.png --config agent.yaml",
                                       "example: atrius versions Art/hero.png --config agent.yaml --json",
                                       ONE_SHOT_EXIT),
                        formatter_class=raw)
    file_id_arg(sp)
    config_arg(sp, "space and broker")
    sp.add_argument("--json", action="store_true",
                    help="print a JSON list of objects with version, hash, size, author, time, ... "
                         "(default: a table)")
    sp.set_defaults(func=_cmd_versions)

    sp = sub.add_parser("restore", help="make an earlier version the new head on every device",
                        description="Make version N the new head: a new version with N's content, delivered to "
                                    "every device. Restoring the version before a deletion brings the file back.",
                        epilog=_epilog("example: atrius restore art/hero.png --version 3 --config agent.yaml",
                                       EXIT_CODES + " (1 also: no broker or coordinator within 5 s, "
                                                    "unknown file or version)"),
                        formatter_class=raw)
    file_id_arg(sp)
    sp.add_argument("--version", type=_positive_int, required=True, metavar="N",
                    help="the version to restore, as listed by atrius versions; required")
    config_arg(sp)
    sp.set_defaults(func=_cmd_restore)

    sp = sub.add_parser("lock", help="lock a file for this device: read-only on every other device",
                        description="Lock a file for this device: read-only on every other device until you "
                                    "unlock it or the TTL runs out. Locking a file you hold renews it.",
                        epilog=_epilog("example: atrius lock art/hero.png --config agent.yaml --ttl 4h "
                                       "--note 'repainting'",
                                       "exit codes: 0 locked, 3 locked by another device, 1 refused or failed, "
                                       "2 usage or config error"),
                        formatter_class=raw)
    file_id_arg(sp)
    config_arg(sp)
    sp.add_argument("--ttl", type=_duration, metavar="DURATION",
                    help="release the lock by itself after this long, e.g. 90s, 30m, 4h, 2d, 1h30m "
                         "(default: never)")
    sp.add_argument("--note", default="", help="a note shown to others, e.g. what you are doing (default: none)")
    sp.set_defaults(func=_cmd_lock)

    sp = sub.add_parser("unlock", help="release a lock (--force: another device's, recorded in the history)",
                        description="Release your lock on a file; --force breaks another device's lock "
                                    "(recorded in the lock history).",
                        epilog=_epilog("example: atrius unlock art/hero.png --config agent.yaml",
                                       "example: atrius unlock art/hero.png --config agent.yaml --force",
                                       "exit codes: 0 unlocked or not locked, 3 locked by another device, 1 failed, "
                                       "2 usage or config error"),
                        formatter_class=raw)
    file_id_arg(sp)
    config_arg(sp)
    sp.add_argument("--force", action="store_true",
                    help="break a lock held by another device (default: only your own lock)")
    sp.set_defaults(func=_cmd_unlock)

    sp = sub.add_parser("status", help="devices, files, locks and local state of a space",
                        description="Print the devices, files, locks and recent lock events of the space, with "
                                    "the local state of each file. The agent need not be running.",
                        epilog=_epilog("example: atrius status --config agent.yaml",
                                       "example: atrius status --config agent.yaml --json",
                                       EXIT_CODES + " (1 also: no broker; or no coordinator, table still printed)"),
                        formatter_class=raw)
    config_arg(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object (default: tables)")
    sp.set_defaults(func=_cmd_status)

    sp = sub.add_parser("init", help="write a commented starter agent.yaml for this device",
                        description="Write a commented starter agent config for this device (auth and TLS "
                                    "commented out). Never overwrites an existing file without --force.",
                        epilog=_epilog("example: atrius init --broker mqtt://studio-server:1883 --space my-game",
                                       "example: atrius init --device alice-pc -o configs/alice.yaml --force",
                                       EXIT_CODES + " (2 also: the file exists, a bad URL or name)"),
                        formatter_class=raw)
    sp.add_argument("--broker", metavar="URL", help="broker URL (default mqtt://127.0.0.1:1883)")
    sp.add_argument("--space", default="my-game", metavar="NAME", help="space name (default my-game)")
    sp.add_argument("--device", metavar="NAME", help="device name (default: from the host name)")
    sp.add_argument("--output", "-o", default="agent.yaml", metavar="FILE", help="file to write (default agent.yaml)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file (default: refuse, exit 2)")
    sp.set_defaults(func=_cmd_init)

    sp = sub.add_parser("agent", help="sync the files listed in a YAML config",
                        description="Sync the files and folders listed in the config until Ctrl-C / SIGTERM "
                                    "(a clean stop publishes presence offline).",
                        epilog=_epilog("example: atrius agent --config agent.yaml",
                                       "example: atrius agent --config agent.yaml --tui   (the live screen while "
                                       "syncing)",
                                       EXIT_CODES + " (the agent keeps retrying an unreachable broker)"),
                        formatter_class=raw)
    config_arg(sp, "device, space, broker, files and folders")
    sp.add_argument("--tui", action="store_true",
                    help="show the live terminal UI (devices, files, transfers, events) while syncing; "
                         "plain log lines on stdout when it is not a terminal (default: log lines on stderr)")
    sp.set_defaults(func=_cmd_agent)

    sp = sub.add_parser("tui", help="watch a space live in the terminal without syncing anything",
                        description="Watch a space live (devices, files, locks, transfers, events) without "
                                    "syncing anything. Plain lines when stdout is not a terminal; Ctrl-C quits.",
                        epilog=_epilog("example: atrius tui --config agent.yaml   (Ctrl-C to quit)",
                                       EXIT_CODES),
                        formatter_class=raw)
    config_arg(sp, "space and broker; this device's files give the local column")
    sp.set_defaults(func=_cmd_tui)

    sp = sub.add_parser("demo", help="the tour: a hub and three devices on this machine, on the live screen",
                        description="The tour: an embedded hub and three devices on this machine, watched on the "
                                    "live screen, with a scripted story (sync, a lock, a conflict copy, a device "
                                    "catching up, a restore). Exits by itself with a summary and removes its "
                                    "temporary folder.",
                        epilog=_epilog("example: atrius demo",
                                       "example: atrius demo --forever   (keep everything running; Ctrl-C quits)",
                                       "example: atrius demo --screenshot tui.svg",
                                       EXIT_CODES),
                        formatter_class=raw)
    sp.add_argument("--forever", action="store_true",
                    help="keep the hub and devices running after the tour (default: exit with a summary)")
    sp.add_argument("--size", type=_positive_int, default=8 * 1024 * 1024, metavar="BYTES",
                    help="size of the demo texture in bytes (default 8 MiB)")
    sp.add_argument("--screenshot", metavar="FILE.svg",
                    help="save the last screen as an SVG file (default: none)")
    sp.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _setup_logging(args.verbose, args.log_file, one_shot=args.command in ONE_SHOT)
    except OSError as exc:  # an unwritable --log-file
        print(f"atrius: cannot write the log file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except UsageError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except Exception as exc:
        if args.verbose:
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
