"""Reading traced programs in tests: every equation of a jaxpr, nested ones included."""

from __future__ import annotations

from typing import Any, Iterator


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of `jaxpr` (a ClosedJaxpr or Jaxpr) and of the jaxprs in its equations'
    parameters (scan and while bodies, jit and custom-VJP calls, cond branches), depth first."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from equations(sub)
