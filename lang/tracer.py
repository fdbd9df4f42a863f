"""Find a program's constant prefix by running its body on placeholder arguments: the text (and
role markup) appended before the first use of an argument or the first gen is the same for every
item of a batch, so run_batch can prefill it once before launching the items."""

from __future__ import annotations

from arborlm.lang import ir


class TraceStop(Exception):
    """The program touched something that differs between items: the constant prefix ends here."""


class Placeholder:
    """An argument's stand-in: concatenation is recorded, any other use of its value stops the trace."""

    def __init__(self, name: str):
        self._name = name

    def _stop(self, *args, **kwargs):
        raise TraceStop(self._name)

    __str__ = __format__ = __bool__ = __len__ = __iter__ = __getitem__ = __eq__ = __lt__ = _stop
    __contains__ = __int__ = __float__ = __call__ = __mul__ = __mod__ = _stop
    __hash__ = object.__hash__

    def __getattr__(self, name):
        raise TraceStop(self._name)

    def __add__(self, other):
        return ir.ExprList([self, other])

    def __radd__(self, other):
        return ir.ExprList([other, self])


class TracingState:
    """Stands in for `s`: collects constant expressions; anything else stops the trace."""

    def __init__(self):
        self.exprs: list = []

    def __iadd__(self, expr):
        for item in expr.items if isinstance(expr, ir.ExprList) else [expr]:
            if not isinstance(item, (str, ir.RoleBegin, ir.RoleEnd)):
                raise TraceStop(type(item).__name__)
            self.exprs.append(item)
        return self

    def _role(self, role):
        state = self

        class _Block:
            def __enter__(self):
                state.__iadd__(ir.RoleBegin(role))

            def __exit__(self, *exc):
                if exc[0] is None:
                    state.__iadd__(ir.RoleEnd(role))

        return _Block()

    def system(self):
        return self._role("system")

    def user(self):
        return self._role("user")

    def assistant(self):
        return self._role("assistant")

    def __getattr__(self, name):
        raise TraceStop(name)

    def __getitem__(self, name):
        raise TraceStop(name)


def constant_exprs(func, arg_names: list[str]) -> list:
    """The constant expressions a program appends first, whatever its arguments are."""
    state = TracingState()
    try:
        func(state, **{name: Placeholder(name) for name in arg_names})
    except Exception:  # noqa: BLE001 - TraceStop, or the program failing on a placeholder: stop there
        pass
    return state.exprs
