"""`global_config`, SGLang's process-wide frontend settings, so programs that set them port unchanged.

`default_backend` is the backend `set_default_backend` sets. The tracing / parallel-encoding switches
only tune SGLang's interpreter and are accepted as they are; the two output-tokenisation switches
would change the text, which this frontend does not support, so turning them off is refused.
"""

from __future__ import annotations

_FIXED = {"skip_special_tokens_in_output": True, "spaces_between_special_tokens_in_out": True}


class GlobalConfig:
    def __init__(self):
        self.verbosity = 0
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True

    @property
    def default_backend(self):
        from arborlm.lang import backend

        return backend._default

    @default_backend.setter
    def default_backend(self, value) -> None:
        from arborlm.lang import backend

        backend._default = None if value is None else backend.as_backend(value)

    def __getattr__(self, name):
        if name in _FIXED:
            return _FIXED[name]
        raise AttributeError(f"global_config has no setting {name!r}")

    def __setattr__(self, name, value) -> None:
        if name in _FIXED and value != _FIXED[name]:
            raise NotImplementedError(f"global_config.{name} = {value!r} is not supported by arborlm.lang")
        if name in _FIXED:
            return
        object.__setattr__(self, name, value)


global_config = GlobalConfig()

__all__ = ["GlobalConfig", "global_config"]
