"""The web console at ``/console``: sign-in and sign-out, and the page every console URL
serves (the script then draws the catalog, a table or the SQL editor from the API).

The console is a client of the API like any other: its script calls ``/v1`` with the
session cookie (``app/access/sessions.py``) instead of a bearer token, and the same
guard, grants, tenancy, row filters and masks apply (``app/api/guards.py``). This
module only signs in and out and serves the page shell; it reads no data itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jwt
from litestar import Request, Response, Router, get, post
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency
from litestar.enums import MediaType, RequestEncodingType
from litestar.params import Body, QueryParameter
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router

from app.access.sessions import COOKIE, csrf_ok
from app.services import Services
from events.errors import LedgerError

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
# Pages run only the console's own script and style: nothing inline, nothing from
# elsewhere, and they cannot be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _next(raw: str | None) -> str:
    """Where to go after sign-in: a console path of this site, nothing else."""
    if not raw:
        return "/console"
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console"):
        return "/console"
    if raw.startswith("//") or "\\" in raw:
        return "/console"
    return raw


def _secure(request: Request[Any, Any, Any], services: Services) -> bool:
    public = services.settings.public_url or ""
    proto = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or public.startswith("https:") or proto == "https"


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    """A form post from a page of this site (browsers send Origin with every POST)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site form: the CSRF token still applies
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _page(name: str, status: int = 200, **context: Any) -> Template:
    return Template(
        template_name=name,
        context=context,
        status_code=status,
        headers={"content-security-policy": CSP, "cache-control": "no-store"},
    )


@get("/sign-in", name="console_sign_in_page")
async def sign_in_page(
    next_: Annotated[str | None, QueryParameter(name="next")] = None,
) -> Template:
    return _page("sign_in.html", next=_next(next_), error="")


@post("/sign-in", status_code=303)
async def sign_in(
    request: Request[Any, Any, Any], services: NamedDependency[Services], data: Form
) -> Response[Any]:
    """Check the token as the API would, then open a session and go where the user was
    headed. A wrong token is the sign-in page again, with the reason, and no session."""
    target = _next(data.get("next"))
    token = (data.get("token") or "").strip()
    if not _same_origin(request):
        error = "This form was sent from another site."
        return _page("sign_in.html", 403, next=target, error=error)
    if not token:
        return _page("sign_in.html", 400, next=target, error="Enter a token.")
    try:
        caller = await services.auth.authenticate(f"Bearer {token}", services.settings.api_token)
    except LedgerError as exc:
        return _page("sign_in.html", 401, next=target, error=exc.message)
    expires_at = None
    if caller.token_id == "jwt":
        # (Verified by authenticate: only its expiry is read here.)
        claims = jwt.decode(token, options={"verify_signature": False})
        expires_at = float(claims["exp"]) if "exp" in claims else None
    session_id, session = await services.sessions.create(
        caller.principal.id, caller.token_id, expires_at=expires_at
    )
    response = Redirect(target, status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=_secure(request, services),
        path="/",
        max_age=int(max(1, session.ends - time.time())),
    )
    return response


@post("/sign-out", status_code=303)
async def sign_out(
    request: Request[Any, Any, Any], services: NamedDependency[Services], data: Form
) -> Response[Any]:
    """End the session (the form carries its CSRF token) and forget the cookie."""
    session_id = request.cookies.get(COOKIE, "")
    session = await services.sessions.get(session_id)
    sent = data.get("csrf")
    if session is not None and (not _same_origin(request) or not csrf_ok(session, sent)):
        return Response("the sign-out form's CSRF token is missing or wrong", status_code=403,
                        media_type="text/plain")  # fmt: skip
    await services.sessions.end(session_id)
    response = Redirect("/console/sign-in", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@get(["/", "/{path:path}"], name="console_page", media_type=MediaType.HTML)
async def page(request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Any:
    """Every console URL: the page shell for a signed-in user (the script draws what the
    path names), the sign-in page for anyone else, coming back here afterwards."""
    session = await services.sessions.get(request.cookies.get(COOKIE, ""))
    caller = None
    if session is not None:
        try:
            caller = await services.auth.caller_again(
                session.principal, session.token, services.settings.api_token
            )
        except LedgerError:
            caller = None
    if caller is None:
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = Redirect(f"/console/sign-in?next={quote(asked)}", status_code=303)
        if session is not None or COOKIE in request.cookies:
            response.delete_cookie(COOKIE, path="/")
        return response
    assert session is not None
    return _page(
        "console.html",
        csrf=session.csrf,
        principal=caller.principal.name,
        # Admin pages are for those who manage principals (shown to no one else).
        manages=caller.admin or any("grant" in caller.permissions(g) for g in caller.grants),
    )


STATIC = create_static_files_router(
    path="/console/static",
    directories=[HERE / "static"],
    name="console_static",
    cache_control=CacheControlHeader(max_age=300, public=True),
    include_in_schema=False,
)
CONSOLE = Router(
    path="/console",
    route_handlers=[sign_in_page, sign_in, sign_out, page],
    include_in_schema=False,
)
