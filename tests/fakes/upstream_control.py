"""The fake upstream's HTTP control API under ``/_fake/``, for tests in another process.

It mirrors the Python API of ``FakeUpstream``; see tests/README.md for the request shapes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request
from quart_trio import QuartTrio

from .faults import Fault

if TYPE_CHECKING:
    from .upstream import FakeAccount, FakeUpstream

_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "reply_text": str,
    "websocket_enabled": bool,
    "event_delay": (int, float),
    "access_ttl": (int, float),
    "device_auto_approve_after": (int, type(None)),
    "device_poll_interval": (int, float),
    "revoke_family_on_reuse": bool,
    "models": list,
    "websocket_max_age": (int, float, type(None)),
    "websocket_close_after_turns": (int, type(None)),
    "transcription_text": (str, type(None)),
}


def _answer(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _account_json(fake: FakeUpstream, account: FakeAccount) -> dict[str, Any]:
    return {
        "email": account.email,
        "chatgpt_account_id": account.chatgpt_account_id,
        "chatgpt_user_id": account.chatgpt_user_id,
        "plan": account.plan,
        "access_token": account.access_token,
        "refresh_token": account.refresh_token,
        "id_token": account.id_token,
        "auth_json": fake.auth_json(account),
    }


def _require(data: dict[str, Any], key: str) -> Any:
    if key not in data:
        raise ValueError(f"missing field {key!r}")
    return data[key]


def add_control_routes(app: QuartTrio, fake: FakeUpstream) -> None:
    control = Blueprint("fake_control", __name__, url_prefix="/_fake")

    async def body() -> dict[str, Any]:
        data = await request.get_json(force=True, silent=True)
        return data if isinstance(data, dict) else {}

    @control.errorhandler(KeyError)
    async def unknown_key(error: KeyError) -> Response:
        return _answer({"error": f"unknown: {error}"}, 404)

    @control.errorhandler(ValueError)
    async def bad_value(error: ValueError) -> Response:
        return _answer({"error": str(error)}, 400)

    @control.post("/accounts")
    async def add_account() -> Response:
        data = await body()
        account = fake.add_account(
            email=str(data.get("email", "a@example.com")),
            chatgpt_account_id=str(data.get("chatgpt_account_id", "acct-a")),
            plan=str(data.get("plan", "plus")),
            chatgpt_user_id=data.get("chatgpt_user_id"),
        )
        return _answer(_account_json(fake, account), 201)

    @control.get("/accounts/<chatgpt_account_id>")
    async def get_account(chatgpt_account_id: str) -> Response:
        return _answer(_account_json(fake, fake.account(chatgpt_account_id)))

    @control.post("/fault")
    async def add_fault() -> Response:
        data = await body()
        fault = Fault.from_json(_require(data, "fault"))
        times = data.get("times", 1)
        fake.fault(
            str(data.get("account", "*")), str(_require(data, "endpoint")), fault, times=times
        )
        return _answer({"queued": fault.to_json(), "times": times})

    @control.get("/counters")
    async def counters() -> Response:
        return _answer({"counters": fake.counters, "pending_faults": fake.faults.pending()})

    @control.get("/requests")
    async def requests() -> Response:
        endpoint = request.args.get("endpoint")
        rows = fake.requests_for(endpoint) if endpoint else fake.requests
        return _answer({"requests": [row._asdict() for row in rows]})

    @control.post("/reset")
    async def reset() -> Response:
        fake.reset()
        return _answer({"reset": True})

    @control.post("/usage")
    async def set_usage() -> Response:
        data = await body()
        account_id = str(_require(data, "account"))
        del data["account"]
        flags = {k: bool(data.pop(k)) for k in ("has_credits", "credits_unlimited") if k in data}
        if "credits_balance" in data:
            flags["credits_balance"] = str(data.pop("credits_balance"))
        fake.set_usage(account_id, **flags, **{k: float(v) for k, v in data.items()})
        return _answer({"usage": account_id})

    @control.post("/settings")
    async def settings() -> Response:
        data = await body()
        for name, value in data.items():
            if name == "next_login":
                fake.next_login = fake.account(value) if value else None
                continue
            expected = _SETTINGS.get(name)
            if expected is None or not isinstance(value, expected):
                raise ValueError(f"bad setting {name}={value!r}")
            setattr(fake, name, value)
        return _answer({"settings": sorted(data)})

    @control.post("/websockets/close_idle")
    async def close_idle_websockets() -> Response:
        return _answer({"closed": fake.close_idle_websockets()})

    @control.post("/websockets/age_out")
    async def age_out_websockets() -> Response:
        return _answer({"aged": fake.age_out_websockets()})

    @control.post("/rotate")
    async def rotate() -> Response:
        account = fake.rotate_tokens(str(_require(await body(), "account")))
        return _answer(_account_json(fake, account))

    @control.post("/revoke_access")
    async def revoke_access() -> Response:
        account_id = str(_require(await body(), "account"))
        fake.revoke_access_token(account_id)
        return _answer({"revoked": account_id})

    @control.post("/device/approve")
    async def approve_device() -> Response:
        data = await body()
        account_id = data.get("account")
        fake.approve_device(
            str(_require(data, "user_code")), fake.account(account_id) if account_id else None
        )
        return _answer({"approved": data["user_code"]})

    app.register_blueprint(control)
