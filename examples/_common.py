"""Shared by the lang examples: the backend to run on (the embedded model in-process, or --url)."""

import argparse


def backend_from_args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", help="a running arborlm server (default: the embedded model in-process)")
    p.add_argument("--api-key")
    args = p.parse_args()
    if args.url:
        from arborlm.lang import RuntimeEndpoint

        return RuntimeEndpoint(args.url, api_key=args.api_key)
    from arborlm.runtime import Engine

    return Engine()
