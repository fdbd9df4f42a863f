"""ServerArgs: EngineArgs plus the HTTP settings, and the command line built from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from arborlm.runtime.config import EngineArgs


@dataclass
class ServerArgs(EngineArgs):
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 30000
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    served_model_name: str | None = None  # the name /v1/models lists; None: the model folder's name
    max_request_bytes: int = 8 << 20  # larger request bodies get 413
    log_level: str = "info"
    stream_interval: int = 1  # a streamed request reports every this many tokens
    tool_call_parser: str = "auto"  # hermes, llama3 or mistral; auto: read from the chat template

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        from arborlm.runtime.tool_calls.formats import FORMATS

        if self.tool_call_parser != "auto" and self.tool_call_parser not in FORMATS:
            raise ValueError(f"tool_call_parser must be auto or one of {sorted(FORMATS)}, got {self.tool_call_parser!r}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")

    def engine_args(self) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def model_name(self, model_dir: str) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_path is None:  # the embedded model
            from arborlm.runtime.model.loader import EMBEDDED_GGUF

            return EMBEDDED_GGUF.split(".")[0]
        return os.path.basename(os.path.normpath(self.model_path))

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="arborlm serve", description="Serve a model over HTTP.")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type)
            if kind.startswith("bool"):  # --flag / --no-flag, so a default-on feature can be turned off
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                conv = int if kind.startswith("int") else float if kind.startswith("float") else str
                p.add_argument(flag, type=conv, default=f.default)
        return p

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> "ServerArgs":
        ns = cls.parser().parse_args(argv)
        try:
            return cls(**vars(ns))
        except ValueError as e:
            cls.parser().error(str(e))
