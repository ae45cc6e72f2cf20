"""The fake auth server's login flows: browser PKCE codes and device codes.

Both end in an authorization code exchanged at /oauth/token, which starts a new token family
for the account that "approved" the login (the fake approves on the user's behalf).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tokens import CLIENT_ID, FakeAccount, TokenVault, pkce_challenge

DEVICE_CALLBACK_PATH = "/deviceauth/callback"


@dataclass(slots=True, kw_only=True)
class AuthCode:
    """An authorization code waiting for its exchange at /oauth/token."""

    account: FakeAccount
    client_id: str
    redirect_uri: str
    code_challenge: str
    device: bool = False
    used: bool = False


@dataclass(slots=True, kw_only=True)
class DeviceAuth:
    """One device-code login, from usercode to approval."""

    device_auth_id: str
    user_code: str
    pending_polls: int = 0
    account: FakeAccount | None = None
    code: str = ""
    code_verifier: str = ""
    code_challenge: str = ""


class LoginDesk:
    """Issues and redeems authorization codes; tracks device logins."""

    def __init__(self, vault: TokenVault, login_account: Callable[[], FakeAccount | None]):
        self._vault = vault
        self._login_account = login_account
        self.device_auto_approve_after: int | None = None
        self._codes: dict[str, AuthCode] = {}
        self._devices: dict[str, DeviceAuth] = {}

    def new_code(
        self,
        *,
        account: FakeAccount,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        device: bool = False,
    ) -> str:
        code = "ac_fake_" + secrets.token_urlsafe(16)
        self._codes[code] = AuthCode(
            account=account,
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            device=device,
        )
        return code

    def code_owner(self, code: str) -> FakeAccount | None:
        grant = self._codes.get(code)
        return grant.account if grant else None

    def exchange_code(self, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Apply the authorization_code grant (PKCE S256 checked): (status, JSON body)."""

        def bad(description: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": "invalid_grant", "error_description": f"fake: {description}"}

        grant = self._codes.get(str(data.get("code", "")))
        if grant is None or grant.used:
            return bad("unknown or used authorization code")
        if data.get("client_id") != grant.client_id:
            return bad("client_id does not match the authorize request")
        redirect_uri = str(data.get("redirect_uri", ""))
        if grant.device:
            # Any host: the client may reach the auth server through a chaos proxy's port.
            if not redirect_uri.endswith(DEVICE_CALLBACK_PATH):
                return bad(f"device codes need a redirect_uri ending {DEVICE_CALLBACK_PATH}")
        elif redirect_uri != grant.redirect_uri:
            return bad("redirect_uri does not match the authorize request")
        if pkce_challenge(str(data.get("code_verifier", ""))) != grant.code_challenge:
            return bad("code_verifier does not match code_challenge")
        grant.used = True
        session = self._vault.new_session(grant.account)
        return 200, self._vault.token_answer(session)

    def new_device_auth(self) -> DeviceAuth:
        device = DeviceAuth(
            device_auth_id="deviceauth_" + secrets.token_hex(8),
            user_code=f"{secrets.token_hex(2).upper()}-{secrets.token_hex(2).upper()}",
        )
        self._devices[device.device_auth_id] = device
        return device

    def device_auth(self, device_auth_id: str) -> DeviceAuth | None:
        return self._devices.get(device_auth_id)

    def approve_device(self, user_code: str, account: FakeAccount | None = None) -> None:
        for device in self._devices.values():
            if device.user_code == user_code:
                self._approve(device, account or self._login_account())
                return
        raise KeyError(f"no device login with user code {user_code!r}")

    def poll_device(self, device: DeviceAuth) -> bool:
        """One poll of the device token endpoint; True once approved."""
        auto = self.device_auto_approve_after
        if device.account is None and auto is not None and device.pending_polls >= auto:
            self._approve(device, self._login_account())
        if device.account is None:
            device.pending_polls += 1
            return False
        return True

    def _approve(self, device: DeviceAuth, account: FakeAccount | None) -> None:
        if account is None:
            raise ValueError("no account to approve the device login with")
        if device.account is not None:
            return
        device.account = account
        device.code_verifier = secrets.token_urlsafe(48)
        device.code_challenge = pkce_challenge(device.code_verifier)
        device.code = self.new_code(
            account=account,
            client_id=CLIENT_ID,
            redirect_uri=DEVICE_CALLBACK_PATH,
            code_challenge=device.code_challenge,
            device=True,
        )
