"""Role prefixes and suffixes derived from the model's own Jinja chat template.

A program appends role text piece by piece (`s += user(...)`, then a gen inside `assistant`), so
it needs each role's prefix and suffix rather than a whole rendered conversation. Rendering a
message whose content is a sentinel and splitting around it recovers them from any template."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
_S = "\x00ARBOR\x00"
# Earlier turns to render a role after, for templates that insist on an order of roles.
_HISTORIES = ([{"role": "system", "content": "a"}], [{"role": "user", "content": "a"}],
              [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def _raise(message):
    raise TemplateError(message)


@dataclass
class ChatTemplate:
    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    opening: dict[str, str] = field(default_factory=dict)  # text before the first message, by its role

    def begin(self, role: str, first: bool) -> str:
        return (self.opening.get(role, "") if first else "") + self.prefix[role]

    def end(self, role: str) -> str:
        return self.suffix[role]


@lru_cache(maxsize=16)
def from_jinja(source: str, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    tmpl = env.from_string(source)

    def render(messages):
        return tmpl.render(messages=messages, add_generation_prompt=False, bos_token=bos_token or "",
                           eos_token=eos_token or "")

    out = ChatTemplate()
    for role in ROLES:
        for history in _HISTORIES:
            try:
                base = render(history)
                full = render(history + [{"role": role, "content": _S}])
            except TemplateError:
                continue
            if full.startswith(base) and full.count(_S) == 1:
                out.prefix[role], out.suffix[role] = full[len(base):].split(_S)
                break
        else:
            raise ValueError(f"the chat template cannot render a {role!r} message after earlier turns")
        try:
            alone = render([{"role": role, "content": _S}]).split(_S)[0]
        except TemplateError:
            continue  # the template refuses a conversation that starts with this role
        out.opening[role] = alone[: len(alone) - len(out.prefix[role])] if alone.endswith(out.prefix[role]) else ""
    return out


def plain() -> ChatTemplate:
    """For models without a template: `role: content` lines."""
    return ChatTemplate({r: f"{r.capitalize()}: " for r in ROLES}, {r: "\n" for r in ROLES}, {})
