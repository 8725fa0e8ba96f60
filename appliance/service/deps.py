"""What a route gets through FastAPI dependencies: the Appliance, the worker, and who is calling."""

from __future__ import annotations

import collections
import time
from typing import NoReturn

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


REFUSALS_PER_MINUTE = 20  # audited refusals of one user a minute; past it, 429 and counted


class Refusals:
    """Which refusals are audited: each user's first REFUSALS_PER_MINUTE in any minute. Past that, a
    refusal is 429 and counted, and the count goes into that user's next audited refusal, so a flood
    costs a few rows and fsynced checkpoints, not one each (used on the event loop only)."""

    def __init__(self) -> None:
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.suppressed: collections.Counter = collections.Counter()

    def admit(self, user: str, now: float) -> int | None:
        """None: over the budget (counted); else how many were counted since the last audited one."""
        recent = self.recent[user]
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= REFUSALS_PER_MINUTE:
            self.suppressed[user] += 1
            return None
        recent.append(now)
        return self.suppressed.pop(user, 0)


async def refuse(
    request: Request, status: int, message: str, code: str, detail: dict | None = None
) -> NoReturn:
    """Raise ApiError(status, message) after auditing the refusal as `refused` (within the user's budget:
    Refusals; past it, 429)."""
    app, worker, user = get_appliance(request), get_worker(request), user_of(request)
    earlier = request.app.state.refusals.admit(user or "unknown", time.monotonic())
    if earlier is None:
        raise ApiError(
            429,
            f"too many refused requests from {user or 'this caller'}; retry in a minute "
            "(refusals past the first few a minute are counted, not answered)",
            "rate_limited",
            {"Retry-After": "60"},
        )
    row = {
        "route": f"{request.method} {request.url.path}",
        "status": status,
        **(detail or {}),
        **({"suppressed_since": earlier} if earlier else {}),
    }
    await worker.submit(lambda: app.audit("refused", row, with_model=False, user=user))
    raise ApiError(status, message, code)


async def require_admin(request: Request, what: str, detail: dict | None = None) -> None:
    """403 naming the role, audited, unless the caller is an administrator."""
    if is_admin(request):
        return
    app, user = get_appliance(request), user_of(request)
    await refuse(
        request,
        403,
        f"{what} needs the administrator role (the service's user, root, or a member of "
        f"group '{app.settings.admin_group}'); {user or 'this caller'} is an operator",
        "forbidden",
        {"needs": "admin", **(detail or {})},
    )
