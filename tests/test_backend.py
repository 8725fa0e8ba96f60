"""The Appliance and the service's client implement one Backend (appliance.protocols): every parameter
the protocol names is accepted by both, in the same position or as a keyword, with the same default.
A signature that drifts on either side (a new required argument, a renamed one, a default that
differs) fails here before a command behaves differently through the service."""

import inspect

import pytest

from appliance.app import Appliance
from appliance.client import ServiceClient
from appliance.protocols import Backend

METHODS = [name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")]


def _params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("cls", [Appliance, ServiceClient])
@pytest.mark.parametrize("name", METHODS)
def test_both_backends_take_the_protocols_arguments(cls, name):
    wanted = _params(getattr(Backend, name))
    given = _params(getattr(cls, name))
    by_name = {p.name: p for p in given}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in given)
    for i, p in enumerate(wanted):
        if p.kind is p.VAR_KEYWORD:
            assert takes_kwargs or len(given) > len(wanted), f"{cls.__name__}.{name} takes no extra fields"
            continue
        assert p.name in by_name, f"{cls.__name__}.{name} lacks {p.name!r}"
        q = by_name[p.name]
        assert q.kind == p.kind, f"{cls.__name__}.{name}({p.name}): {q.kind} instead of {p.kind}"
        assert q.default == p.default, f"{cls.__name__}.{name}({p.name}) defaults to {q.default!r}, not {p.default!r}"
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert given.index(q) == i, f"{cls.__name__}.{name}({p.name}) is not argument {i + 1}"
    extra = [q for q in given if q.name not in {p.name for p in wanted} and q.kind not in (q.VAR_KEYWORD,)]
    assert all(q.default is not q.empty for q in extra), f"{cls.__name__}.{name} needs more than the protocol"


def test_the_protocol_covers_what_the_cli_and_ui_call():
    assert {"ask", "search", "ingest", "install_bundle", "audit_verify", "feedback_export"} <= set(METHODS)
