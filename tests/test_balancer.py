"""The account-selection policy: skip rules, headroom, load spreading, stickiness."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from actors.accounts import Account, AccountStatus, TokenSet, Usage, UsageWindow
from actors.balancer import (
    AllCoolingDown,
    BalancerError,
    Choice,
    NoAccounts,
    NoEligibleAccounts,
    StickyTable,
    choose,
    headroom,
    is_eligible,
    sticky_key,
)

NOW = 1_700_000_000.0
TOKENS = TokenSet(access_token="a", refresh_token="r", id_token="i")


def account(
    account_id: str,
    *,
    created_at: float = 0.0,
    primary: float | None = None,
    secondary: float | None = None,
    primary_reset: float | None = None,
    **changes: Any,
) -> Account:
    usage = Usage(
        primary=None
        if primary is None
        else UsageWindow(used_percent=primary, reset_at=primary_reset),
        secondary=None if secondary is None else UsageWindow(used_percent=secondary),
    )
    return Account(
        id=account_id,
        email=f"{account_id}@example.com",
        chatgpt_account_id=f"chatgpt-{account_id}",
        tokens=TOKENS,
        usage=usage,
        created_at=created_at,
        **changes,
    )


def pick(accounts: list[Account], **kwargs: Any) -> Choice:
    kwargs.setdefault("in_flight", {})
    return choose(accounts, now=NOW, **kwargs)


# --- eligibility --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "eligible"),
    [
        ({}, True),
        ({"status": AccountStatus.PAUSED}, False),
        ({"status": AccountStatus.REAUTH_REQUIRED}, False),
        ({"status": AccountStatus.DEACTIVATED}, False),
        ({"cooldown_until": NOW + 1}, False),
        ({"cooldown_until": NOW}, True),  # the cooldown ends exactly now
        ({"cooldown_until": NOW - 60}, True),
        # A stored COOLING_DOWN status is only a display status: the timestamp decides.
        ({"status": AccountStatus.COOLING_DOWN, "cooldown_until": NOW - 1}, True),
    ],
)
def test_is_eligible(changes: dict[str, Any], eligible: bool) -> None:
    assert is_eligible(account("a", **changes), NOW) is eligible


@pytest.mark.parametrize(
    "changes",
    [
        {"status": AccountStatus.PAUSED},
        {"status": AccountStatus.REAUTH_REQUIRED},
        {"status": AccountStatus.DEACTIVATED},
        {"cooldown_until": NOW + 30},
    ],
)
def test_choose_skips_ineligible_accounts(changes: dict[str, Any]) -> None:
    # The skipped account is older and fresher, so it would win if it were eligible.
    skipped = account("skipped", created_at=0, primary=0, **changes)
    chosen = account("chosen", created_at=1, primary=90)
    assert pick([skipped, chosen]).account.id == "chosen"


def test_choose_skips_excluded_accounts() -> None:
    first, second = account("a", primary=0), account("b", primary=50)
    assert pick([first, second], exclude={"a"}).account.id == "b"


def test_empty_pool_raises_no_accounts() -> None:
    with pytest.raises(NoAccounts):
        pick([])
    assert issubclass(NoAccounts, BalancerError)


def test_all_cooling_down_carries_the_earliest_reset() -> None:
    accounts = [
        account("a", cooldown_until=NOW + 300),
        account("b", cooldown_until=NOW + 60),
        account("c", cooldown_until=NOW + 900),
        account("paused", status=AccountStatus.PAUSED, cooldown_until=NOW + 5),
    ]
    with pytest.raises(AllCoolingDown) as caught:
        pick(accounts)
    # The paused account's cooldown does not count: it will not serve when that ends.
    assert caught.value.resets_at == NOW + 60


def test_all_cooling_down_counts_tried_accounts_for_the_reset() -> None:
    accounts = [account("a", cooldown_until=NOW + 20), account("b", cooldown_until=NOW + 90)]
    with pytest.raises(AllCoolingDown) as caught:
        pick(accounts, exclude={"a"})
    assert caught.value.resets_at == NOW + 20


def test_no_eligible_accounts_says_which_statuses() -> None:
    accounts = [
        account("a", status=AccountStatus.PAUSED),
        account("b", status=AccountStatus.PAUSED),
        account("c", status=AccountStatus.REAUTH_REQUIRED),
        account("d", status=AccountStatus.DEACTIVATED),
    ]
    with pytest.raises(NoEligibleAccounts) as caught:
        pick(accounts)
    assert caught.value.by_status == {"paused": 2, "reauth_required": 1, "deactivated": 1}
    assert caught.value.tried == 0
    message = str(caught.value)
    assert "2 paused" in message
    assert "1 reauth_required" in message
    assert "1 deactivated" in message


def test_every_account_tried_raises_no_eligible_accounts() -> None:
    accounts = [account("a"), account("b"), account("c", status=AccountStatus.PAUSED)]
    with pytest.raises(NoEligibleAccounts) as caught:
        pick(accounts, exclude={"a", "b"})
    assert caught.value.tried == 2
    assert caught.value.by_status == {"paused": 1}
    assert "2 already tried" in str(caught.value)


# --- headroom ------------------------------------------------------------------------------


def test_headroom_without_usage_is_full() -> None:
    assert headroom(account("a"), NOW) == 100.0


def test_headroom_binding_window_wins() -> None:
    assert headroom(account("a", primary=20, secondary=70), NOW) == 30.0
    assert headroom(account("a", primary=85, secondary=10), NOW) == 15.0


def test_headroom_ignores_a_window_that_has_reset() -> None:
    rolled_over = account("a", primary=95, primary_reset=NOW - 1, secondary=40)
    assert headroom(rolled_over, NOW) == 60.0
    still_live = account("a", primary=95, primary_reset=NOW + 1, secondary=40)
    assert headroom(still_live, NOW) == 5.0


def test_headroom_is_clamped() -> None:
    assert headroom(account("a", primary=130), NOW) == 0.0
    assert headroom(account("a", primary=-5), NOW) == 100.0


def test_choose_prefers_headroom() -> None:
    accounts = [
        account("busy", created_at=0, primary=80),
        account("fresh", created_at=1, primary=10),
        account("weekly", created_at=2, primary=0, secondary=95),
    ]
    choice = pick(accounts)
    assert choice.account.id == "fresh"
    assert choice.sticky_hit is False


def test_choose_prefers_fewer_in_flight_on_equal_headroom() -> None:
    accounts = [account("a", created_at=0), account("b", created_at=1)]
    assert pick(accounts, in_flight={"a": 2, "b": 1}).account.id == "b"


def test_ties_break_by_creation_then_id() -> None:
    accounts = [account("z", created_at=5), account("y", created_at=3), account("x", created_at=3)]
    assert pick(accounts).account.id == "x"


def test_exhausted_accounts_come_last_whatever_their_load() -> None:
    accounts = [
        account("exhausted", created_at=0, primary=100),
        account("ok", created_at=1, primary=90),
    ]
    # "ok" has 10 % headroom and a lot in flight; it still beats an account that would 429.
    assert pick(accounts, in_flight={"ok": 10}).account.id == "ok"


def test_only_exhausted_accounts_are_still_tried() -> None:
    accounts = [account("a", primary=100), account("b", primary=100, created_at=1)]
    assert pick(accounts).account.id == "a"


def simulate(accounts: list[Account], requests: int) -> Counter[str]:
    in_flight: Counter[str] = Counter()
    for _ in range(requests):
        chosen = choose(accounts, now=NOW, in_flight=in_flight).account.id
        in_flight[chosen] += 1
    return in_flight


def test_concurrent_requests_spread_evenly() -> None:
    accounts = [account(name, created_at=i) for i, name in enumerate("abcd")]
    assert simulate(accounts, 32) == {"a": 8, "b": 8, "c": 8, "d": 8}


def test_spreading_still_favours_headroom() -> None:
    accounts = [account("fresh", primary=0), account("used", primary=50, created_at=1)]
    counts = simulate(accounts, 32)
    assert counts["fresh"] > counts["used"] > 0
    assert counts["fresh"] + counts["used"] == 32


# --- stickiness ----------------------------------------------------------------------------


def test_sticky_hit_overrides_headroom_and_load() -> None:
    accounts = [account("fresh", primary=0), account("sticky", primary=60, created_at=1)]
    choice = pick(accounts, sticky_account_id="sticky", in_flight={"sticky": 5})
    assert choice == Choice(account=accounts[1], sticky_hit=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"cooldown_until": NOW + 120},
        {"status": AccountStatus.PAUSED},
        {"status": AccountStatus.REAUTH_REQUIRED},
        {"primary": 100.0},  # known exhausted: it would only answer 429
    ],
)
def test_sticky_falls_back_when_sticky_account_is_unusable(changes: dict[str, Any]) -> None:
    accounts = [account("sticky", **changes), account("other", created_at=1, primary=30)]
    choice = pick(accounts, sticky_account_id="sticky")
    assert choice.account.id == "other"
    assert choice.sticky_hit is False


def test_sticky_falls_back_when_sticky_account_was_tried() -> None:
    accounts = [account("sticky"), account("other", created_at=1)]
    choice = pick(accounts, sticky_account_id="sticky", exclude={"sticky"})
    assert (choice.account.id, choice.sticky_hit) == ("other", False)


def test_sticky_to_unknown_account_falls_back() -> None:
    choice = pick([account("a")], sticky_account_id="removed")
    assert (choice.account.id, choice.sticky_hit) == ("a", False)


def test_exhausted_sticky_is_kept_when_every_account_is_exhausted() -> None:
    accounts = [account("a", primary=100), account("sticky", primary=100, created_at=1)]
    choice = pick(accounts, sticky_account_id="sticky")
    assert (choice.account.id, choice.sticky_hit) == ("sticky", True)


def test_sticky_table_lru_eviction() -> None:
    table = StickyTable(max_size=2)
    table.set("s1", "a")
    table.set("s2", "b")
    assert table.get("s1") == "a"  # s1 is now the most recently used
    table.set("s3", "c")
    assert table.get("s2") is None
    assert table.get("s1") == "a"
    assert table.get("s3") == "c"
    assert len(table) == 2


def test_sticky_table_rebinding_and_forget_account() -> None:
    table = StickyTable()
    table.set("s1", "a")
    table.set("s2", "a")
    table.set("s3", "b")
    table.set("s1", "b")  # the session moved after a failover
    assert table.forget_account("a") == 1
    assert table.get("s2") is None
    assert table.get("s1") == "b"
    assert table.get("s3") == "b"
    table.forget("s3")
    assert "s3" not in table
    table.forget("never-set")


def test_sticky_table_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="max_size"):
        StickyTable(max_size=0)


# --- sticky keys ---------------------------------------------------------------------------


def test_sticky_key_prefers_session_id_then_thread_id_then_cache_key() -> None:
    body = {"prompt_cache_key": "pck"}
    both = {"Session-Id": "sess", "thread-id": "thr"}
    assert sticky_key(both, body) == "sess"
    assert sticky_key({"Thread-ID": "thr"}, body) == "thr"
    assert sticky_key({}, body) == "pck"
    assert sticky_key({}, None) is None


def test_sticky_key_ignores_blank_and_non_string_values() -> None:
    assert sticky_key({"session-id": "  "}, {"prompt_cache_key": 42}) is None
    assert sticky_key({"session-id": ""}, {"prompt_cache_key": " k "}) == "k"


def test_long_sticky_keys_are_digested() -> None:
    long_key = "x" * 10_000
    key = sticky_key({"session-id": long_key}, None)
    assert key is not None
    assert key.startswith("sha256:")
    assert len(key) < 100
    assert key == sticky_key({}, {"prompt_cache_key": long_key})
