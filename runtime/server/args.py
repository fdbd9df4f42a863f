"""ServerArgs: EngineArgs plus the HTTP settings, and the command line built from its fields.

Every field is a flag (`--max-queued-requests`, booleans also `--no-x`), an environment variable
(`ARBORLM_MAX_QUEUED_REQUESTS`) and a key of a config file (`--config serve.yaml` or `.toml`, keys
with `-` or `_`). The command line wins over the environment, which wins over the file; pydantic-
settings reads and types the environment and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass

from arborlm.runtime.config import EngineArgs

ENV_PREFIX = "ARBORLM_"
ROUTERS = ("prefix", "round-robin", "pow2")


@dataclass
class ServerArgs(EngineArgs):
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    api_key_file: str | None = None
    served_model_name: str | None = None
    max_request_bytes: int = 8 << 20
    log_level: str = "info"
    stream_interval: int = 1
    tool_call_parser: str = "auto"
    # operations (docs/operations.md)
    max_queued_requests: int | None = None  # None: from the KV pool (queued_limit)
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    log_requests: bool = False
    log_requests_text: bool = False
    access_log: bool = True
    cors_allow_origins: str | None = None
    restart_on_failure: bool = False
    exit_with_parent: bool = False
    # scale-out on Ray Serve (docs/cluster.md): the `cluster` extra
    replicas: int = 1
    router: str = "prefix"
    router_imbalance: int = 8
    router_imbalance_ratio: float = 3.0
    ray_address: str | None = None
    replica_cpus: float = 1.0

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
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0 (0 = unbounded), got {self.max_queued_requests}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS}, got {self.router!r}")
        if self.router_imbalance < 0:
            raise ValueError(f"router_imbalance must be >= 0, got {self.router_imbalance}")
        if self.router_imbalance_ratio < 1:
            raise ValueError(f"router_imbalance_ratio must be >= 1, got {self.router_imbalance_ratio}")
        if self.replica_cpus <= 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.replica_cpus}")
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("api_key and api_key_file: give one, not both")
            try:
                with open(self.api_key_file) as f:
                    self.api_key = f.read().strip()
            except OSError as e:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file!r}: {e.strerror}") from e
            if not self.api_key:
                raise ValueError(f"api_key_file: {self.api_key_file!r} is empty")

    def engine_args(self) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def public(self) -> dict:
        """The settings as /get_server_info shows them: never the key."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "api_key"}

    def cors_origins(self) -> list[str]:
        return [o.strip() for o in (self.cors_allow_origins or "").split(",") if o.strip()]

    def queued_limit(self, pool_size: int) -> int | None:
        """--max-queued-requests, or by default a burst that fills the running batch plus as many
        requests as the KV pool holds at 256 tokens each: past that, a new request would wait
        longer than clients do."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests or None
        return self.max_running_requests + pool_size // 256

    def model_name(self, model_dir: str) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_path is None:  # the embedded model
            from arborlm.runtime.model.loader import EMBEDDED_GGUF

            return EMBEDDED_GGUF.split(".")[0]
        return os.path.basename(os.path.normpath(self.model_path))

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """Flags default to SUPPRESS, so only those given reach the namespace (and win)."""
        p = argparse.ArgumentParser(
            prog="arborlm serve", description="Serve a model over HTTP (SGLang's native API and OpenAI's).",
            epilog=f"Every flag can also come from the environment ({ENV_PREFIX}MAX_QUEUED_REQUESTS=8) or a "
                   "config file (--config); the command line wins, then the environment, then the file.",
            argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", help=f"a YAML or TOML file of settings (also {ENV_PREFIX}CONFIG)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind, _ = _base_type(hints[f.name])
            text = HELP[f.name] + (f" (default: {f.default})" if f.default is not None else "")
            text = text.replace("%", "%%")
            if kind is bool:  # --x / --no-x, so a default-on feature can be turned off
                p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
            else:
                p.add_argument(flag, type=kind, help=text, metavar=f.name.upper())
        return p

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> "ServerArgs":
        parser = cls.parser()
        given = vars(parser.parse_args(argv))
        config = given.pop("config", None) or os.environ.get(ENV_PREFIX + "CONFIG")
        try:
            return cls(**settings(cls, given, os.environ, config))
        except ValueError as e:  # pydantic's ValidationError is a ValueError too
            parser.error(_message(e))


def settings(cls, given: dict, environ, config: str | None) -> dict:
    """The field values: given (the command line) over the environment over the config file."""
    from pydantic import ValidationError, create_model
    from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

    hints = typing.get_type_hints(cls)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}
    file_values = _read_config(config, set(fields)) if config else {}
    env = [k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() != ENV_PREFIX + "CONFIG"]
    unknown = sorted(k for k in env if k[len(ENV_PREFIX):].lower() not in fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: no such setting (the variables are {ENV_PREFIX}<FLAG NAME>, "
                         f"e.g. {ENV_PREFIX}MAX_QUEUED_REQUESTS)")

    class Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    try:
        values = create_model("Settings", __base__=Base, **fields)(**given).model_dump()
        # the key and the key file are one setting: the one from the higher source wins
        for name, other in (("api_key", "api_key_file"), ("api_key_file", "api_key")):
            if name in given and other not in given:
                values[other] = None
        return values
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "settings"
        where = ("the command line" if name in given else f"{ENV_PREFIX}{name.upper()}"
                 if any(k.upper() == ENV_PREFIX + name.upper() for k in env) else repr(config))
        raise ValueError(f"{name}: {err['msg']} (from {where})") from None


def _read_config(path: str, names: set[str]) -> dict:
    import tomllib

    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"config: cannot read {path!r}: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode()) if path.endswith(".toml") else yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"config: {path!r} is not valid {'TOML' if path.endswith('.toml') else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of settings")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"config: {path!r}: {key!r} is no setting (see arborlm serve --help)")
        out[name] = value
    return out


def _base_type(hint) -> tuple[type, bool]:
    """(the type under an `X | None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return hint, False


def _message(e: ValueError) -> str:
    return str(e).splitlines()[0] if "\n" in str(e) else str(e)


HELP = {
    # model and engine
    "model_path": "a Hugging Face model folder or a .gguf file; unset: the embedded SmolLM2-135M-Instruct",
    "tokenizer_path": "the tokenizer's folder; unset: the model's",
    "dtype": "weights and activations: bfloat16, float16 or float32 (the reference precision)",
    "device": "cpu, or cuda where a GPU is present",
    "context_length": "longest prompt plus output in tokens; unset: the model's max_position_embeddings",
    "max_total_tokens": "KV pool size in tokens; unset: from --kv-cache-gb",
    "kv_cache_gb": "KV pool size in GiB when --max-total-tokens is unset",
    "max_running_requests": "requests decoded together at most",
    "chunked_prefill_size": "prompt tokens prefilled in one step; longer prompts go in chunks",
    "disable_radix_cache": "turn the prefix cache off",
    "schedule_policy": "waiting-queue order: lpm (longest cached prefix), fcfs, dfs-weight, or priority "
                       "(the request's priority field first, then arrival; retracts lower-priority running "
                       "requests for higher ones under memory pressure)",
    "schedule_low_priority_values_first": "a lower priority value goes first (vLLM's convention); "
                                          "by default a higher one does (SGLang's)",
    "priority_aging_seconds": "each this many seconds in the queue raise a request's priority by one, "
                              "so low priorities are never starved",
    "attention_backend": "auto, cpu (C++ over the paged pool), torch or triton",
    "random_seed": "seed of sampling without a per-request seed",
    "num_threads": "torch intra-op threads; unset: torch's default",
    "quantization": "weight-only quantisation of decode matmuls: none, int8 or int4; unset: chosen per "
                    "dtype and CPU",
    "compile_decode": "decode steps as torch.compile'd graphs; unset: on for bf16/fp16, off for float32",
    "compile_in_background": "decode eagerly while a batch size's graph compiles",
    "compile_worker": "compile decode graphs in a low-priority worker process (this one only loads them)",
    "warmup_decode_bs": "compile the decode graphs for batch sizes up to this before serving (0: each on first use)",
    "grammar_backend": "constrained decoding: xgrammar or outlines",
    "enable_jump_forward": "append a grammar's forced text without a decode step per token",
    "json_max_string_length": "a JSON output's strings are steered to close after this many characters "
                              "(0: unbounded)",
    "json_max_depth": "a JSON output's nesting is steered to close past this depth (0: unbounded)",
    # HTTP
    "host": "address to listen on (loopback by default)",
    "port": "port to listen on",
    "api_key": "require `Authorization: Bearer <key>` on every route but /health",
    "api_key_file": "read the API key from this file (keeps it out of `ps`)",
    "served_model_name": "the model name /v1/models lists and clients send; unset: the model's folder name",
    "max_request_bytes": "larger request bodies get 413",
    "log_level": "debug, info, warning or error",
    "stream_interval": "a streamed request reports every this many tokens",
    "tool_call_parser": "tool-call format: hermes, llama3, mistral, or auto (read from the chat template)",
    "max_queued_requests": "requests waiting for their first token at most; past it new requests get "
                           "429 with Retry-After (0: unbounded; unset: --max-running-requests + KV pool tokens / 256)",
    "request_timeout": "seconds a request may take before it is aborted and answered with what it has "
                       "(a request's own `timeout` overrides it); unset: no limit",
    "shutdown_timeout": "on SIGTERM, seconds running requests get to finish before they are aborted",
    "log_requests": "log one JSON line per finished request (ids, token counts, latencies; no text)",
    "log_requests_text": "with --log-requests, also log prompt and output text",
    "access_log": "uvicorn's access log (one line per HTTP request)",
    "cors_allow_origins": "comma-separated origins allowed by CORS (`*` for any); unset: no CORS headers",
    "restart_on_failure": "when the scheduler or detokenizer process dies, restart the server instead of "
                          "exiting non-zero",
    "exit_with_parent": "stop (draining) when the process that started this one exits; for supervisors "
                        "that spawn servers, such as the Ray replicas",
    "replicas": "more than 1: serve this many replicas behind one endpoint on Ray Serve (the `cluster` "
                "extra; docs/cluster.md)",
    "router": "with --replicas: prefix (requests sharing a prompt prefix go to the replica that has it "
              "cached, load-aware), round-robin, or pow2 (Ray's power of two choices)",
    "router_imbalance": "with --router prefix: when the replicas' requests in flight differ by more than this "
                        "(and --router-imbalance-ratio holds), the least loaded replica takes a request whatever its prefix",
    "router_imbalance_ratio": "with --router prefix: ... and the busiest replica has more than this many times "
                              "the requests of the least loaded (SGLang's balance_rel_threshold)",
    "ray_address": "with --replicas: join this Ray cluster (`auto`: the local one) instead of starting Ray here",
    "replica_cpus": "with --replicas: logical CPUs Ray reserves per replica (its torch threads follow)",
}
