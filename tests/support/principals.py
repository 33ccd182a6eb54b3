"""A principal with one grant and a token, made through the API as an admin would."""

from __future__ import annotations

from typing import Any


def member(admin: Any, name: str, org: str, role: str, **scope: str) -> dict[str, str]:
    """Create principal ``name`` of ``org``, grant it ``role`` (on the org, or on
    ``super``/``table`` given in ``scope``) and issue it a token: its ``id``,
    ``token_id`` and ``token``. ``admin`` is an httpx or Litestar test client that sends
    an admin's credentials."""
    made = admin.post("/v1/principals", json={"name": name, "kind": "user", "org": org})
    assert made.status_code == 201, made.text
    pid = made.json()["id"]
    grant = {"principal_id": pid, "role": role, "org": org, **scope}
    granted = admin.post("/v1/grants", json=grant)
    assert granted.status_code == 201, granted.text
    issued = admin.post(f"/v1/principals/{pid}/tokens", json={"name": name})
    assert issued.status_code == 201, issued.text
    return {"id": pid, "token_id": issued.json()["id"], "token": issued.json()["token"]}
