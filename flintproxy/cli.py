"""Command line: ``flintproxy serve | mock-upstream | mock-smtp | keygen | admin``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import logging
import os
import resource
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from flintproxy import __version__
from flintproxy.app import runner, supervisor
from flintproxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from flintproxy.crypto import create_key_file, generate_key
from flintproxy.errors import KeyringError, ListenError, SchemaBehind, StoreUnavailable
from flintproxy.tools import admin, mock, mock_smtp

# File-descriptor slots reserved at start-up (at most RLIMIT_NOFILE's soft limit).
FD_TABLE = 65536


def reserve_fd_table(size: int = FD_TABLE) -> int:
    """Grow the process's descriptor table to ``size`` slots now; returns the size.

    Linux doubles the table when a new descriptor does not fit, and in a process
    with threads (aiosqlite's, the access log's) each doubling waits for an RCU grace
    period: 13-15 ms measured here in which the event loop serves nothing, as the
    256th, 512th and 1,024th connection opens. Before any thread exists the growth
    waits for nothing, and the table never shrinks.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        size = min(size, soft)
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # F_DUPFD takes the lowest free slot at or above the one asked for: it can
        # never replace an open descriptor, as dup2 would.
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, size - 1))
    except OSError:
        return 0
    finally:
        os.close(fd)
    return size


def _run(main: Coroutine[Any, Any, None]) -> None:
    reserve_fd_table()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency off Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flintproxy",
                                     description="A lean, fast OpenAI-compatible LLM gateway.")
    parser.add_argument("--version", action="version", version=f"flintproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int,
                       help="run N worker processes on the same ports, supervised (needs "
                       "the shared mode: PostgreSQL + Redis)")
    # A worker of --workers: SO_REUSEPORT on both listeners.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    mock = sub.add_parser("mock-upstream", help="run the OpenAI-compatible mock upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9001)
    mock.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    mock.add_argument("--delay-ms", type=float, default=0.0, help="delay between chunks")
    mock.add_argument("--first-delay-ms", type=float, default=0.0,
                      help="delay before the first chunk")

    smtp = sub.add_parser("mock-smtp", help="run a development SMTP server that prints "
                          "every message it receives")
    smtp.add_argument("--host", default="127.0.0.1")
    smtp.add_argument("--port", type=int, default=2525)

    keygen = sub.add_parser("keygen", help="create the data key file ([crypto] key_file), "
                            "mode 0600, unless it exists; '-' prints a new key instead")
    keygen.add_argument("path", type=Path)

    sub.add_parser("admin", help="operator tasks (run 'flintproxy admin -h')", add_help=False)
    return parser


def _supervise(config: Config, args: argparse.Namespace) -> int:
    """``serve --workers N``: refused with the reason, or supervised until SIGTERM."""
    if args.port is not None:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                        port=args.port))
    why = supervisor.refusal(config, args.workers)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    argv = supervisor.worker_argv(str(args.config), args.host, args.port)
    return supervisor.Supervisor(argv, args.workers,
                                 config.server.shutdown_timeout_s).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flintproxy`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:
        return admin.main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "serve":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        if args.workers is not None:
            return _supervise(config, args)
        # Only the process that owns stdout writes the access log there.
        try:
            _run(runner.serve(config, host=args.host, port=args.port,
                              access_sink=sys.stdout.buffer, reuse_port=args.reuse_port))
        except (ListenError, SchemaBehind, KeyringError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except StoreUnavailable as exc:
            print(f"error: {exc.message} (storage {config.storage.safe_dsn})", file=sys.stderr)
            return 1
        return 0
    if args.command == "mock-upstream":
        settings = mock.MockSettings(chunks=args.chunks, delay_ms=args.delay_ms,
                                     first_chunk_delay_ms=args.first_delay_ms)
        _run(mock.run_mock(args.host, args.port, settings))
        return 0
    if args.command == "mock-smtp":
        _run(mock_smtp.run_mock_smtp(args.host, args.port))
        return 0
    if args.command == "keygen":
        if str(args.path) == "-":
            print(generate_key())
        elif create_key_file(args.path):
            print(f"created data key file {args.path} (mode 0600); keep a copy: "
                  "without it the encrypted account data cannot be read", file=sys.stderr)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands
