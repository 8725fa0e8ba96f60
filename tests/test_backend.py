"""The Appliance and the service's client implement one Backend (appliance.protocols): every parameter
the protocol names is accepted by both, in the same position or as a keyword, with the same default,
and both return the type the protocol declares (the models of appliance.schemas). A signature that
drifts on either side (a new required argument, a renamed one, a default that differs, another
result) fails here before a command behaves differently through the service; so does a call the CLI
or the UI makes on its backend that the protocol does not declare."""

import ast
import inspect
import typing
from pathlib import Path

import pytest

from appliance.app import Appliance
from appliance.client import ServiceClient
from appliance.protocols import Backend

METHODS = [name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")]


def _params(fn) -> list[inspect.Parameter]:
    """What a caller passes: without the instance (`self`, or `app` where the Appliance's method is a
    function of the module that does the work, appliance.intake and the others)."""
    return list(inspect.signature(fn).parameters.values())[1:]


def _hints(cls, name: str) -> dict:
    fn = getattr(cls, name)
    return typing.get_type_hints(fn, globalns={**fn.__globals__, "Appliance": Appliance})


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
        assert q.default == p.default, (
            f"{cls.__name__}.{name}({p.name}) defaults to {q.default!r}, not {p.default!r}"
        )
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert given.index(q) == i, f"{cls.__name__}.{name}({p.name}) is not argument {i + 1}"
    extra = [q for q in given if q.name not in {p.name for p in wanted} and q.kind not in (q.VAR_KEYWORD,)]
    assert all(q.default is not q.empty for q in extra), f"{cls.__name__}.{name} needs more than the protocol"


@pytest.mark.parametrize("cls", [Appliance, ServiceClient])
@pytest.mark.parametrize("name", METHODS)
def test_both_backends_return_the_protocols_type(cls, name):
    wanted = _hints(Backend, name).get("return")
    given = _hints(cls, name).get("return")
    assert wanted is not None, f"Backend.{name} declares no return type"
    assert given == wanted, f"{cls.__name__}.{name} returns {given}, the protocol says {wanted}"


ROOT = Path(__file__).resolve().parent.parent


def _backend_calls(path: Path) -> set[str]:
    """Methods called on a backend in one file: `_backend(ctx).X(...)`, `self.backend.X(...)`, and
    `app.X(...)` in a function that holds `app = _backend(ctx)`."""

    def from_backend(node) -> bool:
        return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_backend"

    calls = set()
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        held = {
            t.id
            for node in ast.walk(function)
            if isinstance(node, ast.Assign) and from_backend(node.value)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and (
                from_backend(node.value)
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "backend")
                or (isinstance(node.value, ast.Name) and node.value.id in held)
            ):
                calls.add(node.attr)
    return calls


def test_the_protocol_covers_what_the_cli_and_ui_call():
    called = {
        name: _backend_calls(path)
        for path in [ROOT / "appliance" / "cli.py", *sorted((ROOT / "tui").rglob("*.py"))]
        for name in [str(path.relative_to(ROOT))]
    }
    assert sum(map(len, called.values())) >= 15, called  # the scan finds the calls (it would pass on none)
    for where, names in called.items():
        assert names <= set(METHODS), (
            f"{where} calls {sorted(names - set(METHODS))} on its backend, which "
            "appliance.protocols.Backend does not declare"
        )


def test_a_newer_bundle_description_still_reads():
    """A bundle.json field this client does not know (a newer builder's) is kept in a result, not refused:
    the bundle itself was checked where it was read."""
    from appliance.schemas import BundleCheck

    check = BundleCheck.model_validate(
        {
            "version": 3,
            "files": 5,
            "targets": ["a"],
            "bytes": 10,
            "notes": [],
            "bundle": {
                "name": "m",
                "version": 3,
                "created": "2026-12-07T00:00:00Z",
                "generation": "0" * 64,
                "model": {"name": "m"},
                "embedder": {"name": "e", "dim": 384},
                "min_ram_mb": 512,
                "added_by_a_newer_builder": True,
            },
        }
    )
    assert check.bundle.name == "m" and check.bundle.model_extra == {"added_by_a_newer_builder": True}
