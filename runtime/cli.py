"""The `arborlm` command: `arborlm serve [options]` (see `arborlm serve --help`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("serve",):
        print("usage: arborlm serve [--model-path PATH] [--host 127.0.0.1] [--port 30000] [...]", file=sys.stderr)
        sys.exit(2)
    from arborlm.runtime.server.launch import main as serve

    serve(argv[1:])


if __name__ == "__main__":
    main()
