"""Route modules, one per resource."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute


def find_route(router: APIRouter, method: str, path: str) -> APIRoute:
    """Return the route of `router` that serves `method` on the path template `path` (prefix included)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route
    raise LookupError(f"no route serves {method} {path}")
