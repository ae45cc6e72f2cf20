"""The ``codex-lb-trio`` command.

Exit codes: 0 ok, 1 a runtime failure (explained in one line), 2 bad configuration
or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from service.config import Config, ConfigError, load_config, with_overrides

log = logging.getLogger("codex_lb_trio")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A failure to report as one line with exit code 1."""


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request line at INFO; keep ours readable.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    config_help = ("config file (default: $CODEX_LB_TRIO_CONFIG, "
                   "else ~/.codex-lb-trio/config.toml if present)")
    # `--config PATH` is accepted before the command and after any (sub)command, where a
    # user would put it. SUPPRESS: a subcommand without it keeps the value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(
        prog="codex-lb-trio",
        description="A local account pool for Codex CLI and OpenAI-compatible clients.",
    )
    parser.add_argument("--config", help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, parents=[common], **kwargs)
        return sub

    serve = command(commands, "serve", help="run the proxy")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 2455)")
    serve.set_defaults(run=cmd_serve)

    accounts = command(commands, "accounts", help="add, list and manage pooled accounts")
    actions = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = command(actions, "import",
                  help="import a Codex CLI auth.json (default ~/.codex/auth.json)")
    imp.add_argument("path", nargs="?", help="auth.json to import")
    imp.set_defaults(run=cmd_accounts_import)
    login = command(actions, "login", help="log in with a browser (or --device)")
    login.add_argument("--device", action="store_true", help="use the device-code flow")
    login.add_argument("--no-browser", action="store_true", help="only print the URL")
    login.set_defaults(run=cmd_accounts_login)
    listing = command(actions, "list", help="show the pooled accounts")
    listing.set_defaults(run=cmd_accounts_list)
    for name, help_text in (("pause", "stop routing requests to an account"),
                            ("resume", "route requests to a paused account again"),
                            ("remove", "delete an account and its tokens")):
        action = command(actions, name, help=help_text)
        action.add_argument("account_id")
        action.set_defaults(run=cmd_accounts_change, change=name)

    status = command(commands, "status", help="ask the running server for accounts and clients")
    status.add_argument("--url", help="server URL (default from the config: http://host:port)")
    status.set_defaults(run=cmd_status)
    return parser


def _with_store(config: Config, work: Callable[[Any], Any]) -> Any:
    from service.store import SQLiteAccountStore, StoreError

    async def main() -> Any:
        store = await SQLiteAccountStore.open(config.home)
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return trio.run(main)
    except StoreError as exc:
        raise CommandError(str(exc)) from None


def _report_import(result: Any) -> None:
    from service.status import printable

    verb = "added" if result.created else "updated"
    account = result.account
    print(printable(f"{verb} account {account.id} "
                    f"({account.email or account.chatgpt_account_id}, plan {account.plan})"))
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)


def cmd_accounts_import(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from service.login import LoginError, default_auth_file, import_auth_file

    path = Path(args.path).expanduser() if args.path else default_auth_file()
    try:
        result = _with_store(config, lambda store: import_auth_file(store, path))
    except LoginError as exc:
        raise CommandError(str(exc)) from None
    _report_import(result)
    return EXIT_OK


def cmd_accounts_login(args: argparse.Namespace, config: Config) -> int:
    import webbrowser

    import httpx

    from service.login import LoginError, login_browser, login_device

    async def work(store: Any) -> Any:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            if args.device:
                return await login_device(store, auth_base_url=config.upstream.auth_base_url, client=client)
            return await login_browser(
                store, auth_base_url=config.upstream.auth_base_url, client=client,
                open_browser=None if args.no_browser else webbrowser.open,
            )

    try:
        result = _with_store(config, work)
    except LoginError as exc:
        raise CommandError(str(exc)) from None
    _report_import(result)
    return EXIT_OK


def cmd_accounts_list(args: argparse.Namespace, config: Config) -> int:
    import time

    from service.login import format_accounts_table

    accounts = _with_store(config, lambda store: store.list_accounts())
    if not accounts:
        print("no accounts yet: add one with `codex-lb-trio accounts import` or `accounts login`")
        return EXIT_OK
    print(format_accounts_table(accounts, time.time()))
    return EXIT_OK


def cmd_accounts_change(args: argparse.Namespace, config: Config) -> int:
    from actors.accounts import AccountNotFound, AccountStatus

    async def work(store: Any) -> None:
        if args.change == "remove":
            await store.remove(args.account_id)
        else:
            status = AccountStatus.PAUSED if args.change == "pause" else AccountStatus.ACTIVE
            await store.set_status(args.account_id, status)

    try:
        _with_store(config, work)
    except AccountNotFound:
        raise CommandError(
            f"no account with id {args.account_id!r} (see `codex-lb-trio accounts list`)"
        ) from None
    past = {"pause": "paused", "resume": "resumed", "remove": "removed"}[args.change]
    print(f"{past} account {args.account_id}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from service.status import run_status

    host = config.server.host if config.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = args.url or f"http://{host}:{config.server.port}"
    api_key = next((k for k in config.auth.api_keys if not k.startswith("sha256:")), None)
    return run_status(url, api_key=api_key)


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from service.server import serve

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        config = with_overrides(config, server=overrides)
    from service.store import StoreError

    try:
        trio.run(serve, config)
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    except BaseExceptionGroup as group:
        os_errors, rest = group.split(OSError)
        if os_errors is not None and rest is None:
            raise CommandError(_describe_os_error(_leaf(os_errors), config)) from None
        store_errors, rest = group.split(StoreError)
        if store_errors is not None and rest is None:
            raise CommandError(str(_leaf(store_errors))) from None
        raise
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, Config], int] = args.run
    config: Config | None = None
    try:
        config = load_config(args.config)
        setup_logging(config.server.log_level)
        return run(args, config)
    except ConfigError as exc:
        print(f"codex-lb-trio: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        return _report_group(group)
    except CommandError as exc:
        print(f"codex-lb-trio: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"codex-lb-trio: {_describe_os_error(exc, config)}", file=sys.stderr)
        return EXIT_FAILURE


def _describe_os_error(exc: OSError, config: Config | None) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE and config is not None:
        return (f"{config.server.host}:{config.server.port} is already in use "
                "(another codex-lb-trio?); pick another with --port")
    return f"{exc.strerror or exc}"


def _report_group(group: BaseExceptionGroup) -> int:
    """Turn the engine's exception group into one line (the traceback went to the log)."""
    from actors.supervisor import CrashLoop

    config_errors, rest = group.split(ConfigError)
    if config_errors is not None:
        print(f"codex-lb-trio: {_leaf(config_errors)}", file=sys.stderr)
        return EXIT_CONFIG
    crash, rest = (rest.split(CrashLoop) if rest is not None else (None, None))
    if crash is not None:
        print(f"codex-lb-trio: {_leaf(crash)}", file=sys.stderr)
        return EXIT_FAILURE
    if rest is not None and rest.split(KeyboardInterrupt)[1] is None:
        return EXIT_INTERRUPTED
    assert rest is not None
    leaf = _leaf(rest)
    log.error("stopped by an unexpected error", exc_info=leaf)
    print(f"codex-lb-trio: stopped by an unexpected error: {type(leaf).__name__}: {leaf}",
          file=sys.stderr)
    return EXIT_FAILURE


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
