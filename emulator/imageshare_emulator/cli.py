"""``imageshare-emulator``: run the ECS emulator as a process (tests, demos, benchmarks)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from imageshare_emulator.data import demo_data, load_data
from imageshare_emulator.server import Emulator


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageshare-emulator",
        description="Serve ECS DescribeImageSharePermission locally, signatures checked.",
    )
    parser.add_argument(
        "--listen", type=parse_listen, default=("127.0.0.1", 8080), help="HOST:PORT (port 0 ok)"
    )
    parser.add_argument("--data", help="JSON data file; the built-in demo data otherwise")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        data = load_data(args.data) if args.data else demo_data()
    except (OSError, ValueError) as exc:
        print(json.dumps({"event": "emulator_failed", "error": str(exc)}), file=sys.stderr)
        return 2
    host, port = args.listen
    emulator = Emulator(host=host, port=port, data=data)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    emulator.start()
    ready = {"event": "emulator_listening", "url": emulator.url, "port": emulator.port}
    print(json.dumps(ready), file=sys.stderr, flush=True)
    stop.wait()
    emulator.stop()
    print(json.dumps({"event": "emulator_stopped"}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
