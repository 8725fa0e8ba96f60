"""What a route gets through FastAPI dependencies: the Appliance, the worker, and who is calling."""

from __future__ import annotations

from fastapi import Request

from appliance.app import Appliance
from appliance.service.errors import ApiError
from appliance.service.worker import Worker

PEER_KEY = "appliance.peer"


def get_appliance(request: Request) -> Appliance:
    return request.app.state.appliance


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


def user_of(request: Request) -> str | None:
    peer = request.scope.get(PEER_KEY)
    return peer["user"] if peer else None


def is_admin(request: Request) -> bool:
    peer = request.scope.get(PEER_KEY)
    return bool(peer and peer.get("admin"))


def admin_gid(group: str) -> int | None:
    """The administrators' group id (`group` is a name or a number); None when no such group exists."""
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None




async def require_admin(request: Request, what: str, detail: dict | None = None) -> None:
    """403 naming the role, audited, unless the caller is an administrator."""
    if is_admin(request):
        return
    app, worker, user = get_appliance(request), get_worker(request), user_of(request)
    await worker.submit(lambda: app.audit("refused", {"route": f"{request.method} {request.url.path}",
                                                      "needs": "admin", **(detail or {})},
                                          with_model=False, user=user))
    raise ApiError(403, f"{what} needs the administrator role (the service's user, root, or a member of "
                        f"group '{app.settings.admin_group}'); {user or 'this caller'} is an operator", "forbidden")
