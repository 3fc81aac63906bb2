"""``devicegw web-user``: add, change or remove a ward dashboard user in the users file."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from pathlib import Path

from devicegw.cli.common import EXIT_CONFIG, SubParsers
from devicegw.cli.terminal import error


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "web-user",
        help="add, change or remove a dashboard user ([http] users_file)",
        description="Writes the users file named by [http] users_file: the user's role and an "
        "argon2id hash of the password (asked twice, or one line on stdin with "
        "--password-stdin). The running gateway reads the file at start.",
    )
    p.add_argument("--users", required=True, type=Path, help="the users file")
    p.add_argument("name")
    p.add_argument("--role", choices=["viewer", "nurse", "engineer"])
    p.add_argument("--remove", action="store_true")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=cmd_web_user)


def cmd_web_user(args: argparse.Namespace) -> int:
    from devicegw.safe_text import is_plain
    from devicegw.web.auth import User, UsersFileError, dump_users, hash_password, load_users

    users: dict[str, User] = {}
    if args.users.exists():
        try:
            users = load_users(args.users)
        except UsersFileError as exc:
            error(exc)
            return EXIT_CONFIG
    name: str = args.name
    if not name or len(name) > 64 or not is_plain(name) or name != name.strip():
        error("the name must be plain text of up to 64 characters")
        return EXIT_CONFIG
    if args.remove:
        if users.pop(name, None) is None:
            error(f"no user {name!r} in {args.users}")
            return EXIT_CONFIG
    else:
        if args.role is None:
            error("--role is required (viewer, nurse or engineer)")
            return EXIT_CONFIG
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {name}: ")
            if getpass.getpass("again: ") != password:
                error("the passwords differ")
                return EXIT_CONFIG
        if len(password) < 8:
            error("a password needs at least 8 characters")
            return EXIT_CONFIG
        users[name] = User(name, args.role, hash_password(password))
    directory = args.users.resolve().parent
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as f:
        f.write(dump_users(users))
    os.chmod(f.name, 0o640)  # the gateway's group reads it; nobody else
    os.replace(f.name, args.users)
    print(f"{args.users}: {'removed' if args.remove else 'saved'} {name}")
    return 0
