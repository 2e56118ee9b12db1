"""What a credentials profile asks for, read from the two files the official tools write.

* ``~/.aliyun/config.json``: the ``aliyun`` CLI's profiles (``mode`` = ``AK``,
  ``StsToken``, ``RamRoleArn``, ``EcsRamRole``, ``OIDC``);
* ``~/.alibabacloud/credentials.ini``: the SDK credentials file (``type`` =
  ``access_key``, ``ram_role_arn``, ``oidc_role_arn``, ``ecs_ram_role``).

Parsing is kept apart from fetching so it can be tested without a network, and so
that a broken profile is reported by name and key, never with the values in it.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.sts import DEFAULT_DURATION_SECONDS


@dataclass(frozen=True)
class StaticSpec:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RamRoleArnSpec:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    role_arn: str
    role_session_name: str | None = None
    duration_seconds: int = DEFAULT_DURATION_SECONDS
    policy: str | None = None
    external_id: str | None = None
    sts_region: str | None = None
    vpc: bool | None = None


@dataclass(frozen=True)
class OidcSpec:
    role_arn: str
    oidc_provider_arn: str
    token_file: str
    role_session_name: str | None = None
    duration_seconds: int = DEFAULT_DURATION_SECONDS
    policy: str | None = None
    sts_region: str | None = None
    vpc: bool | None = None


@dataclass(frozen=True)
class EcsRamRoleSpec:
    role_name: str | None = None


ProfileSpec = StaticSpec | RamRoleArnSpec | OidcSpec | EcsRamRoleSpec


class _Fields:
    """Typed reads from one profile; errors name the profile and the key only."""

    def __init__(self, values: Mapping[str, object], where: str) -> None:
        self._values = values
        self._where = where

    def required(self, key: str) -> str:
        value = self.optional(key)
        if value is None:
            raise CredentialsUnavailable(f"{self._where}: {key} is missing or empty")
        return value

    def optional(self, key: str) -> str | None:
        value = self._values.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str | int):
            raise CredentialsUnavailable(f"{self._where}: {key} must be a string")
        return str(value).strip() or None

    def duration(self, key: str) -> int:
        value = self.optional(key)
        if value is None or value == "0":
            return DEFAULT_DURATION_SECONDS
        try:
            seconds = int(value)
        except ValueError:
            raise CredentialsUnavailable(f"{self._where}: {key} is not a number") from None
        if seconds < 900:
            raise CredentialsUnavailable(f"{self._where}: {key} must be at least 900 seconds")
        return seconds

    def flag(self, key: str) -> bool | None:
        value = self._values.get(key)
        if value is None or value == "":
            return None
        return value is True or str(value).strip().lower() == "true"


def cli_profile_spec(path: Path, profile_name: str | None) -> ProfileSpec:
    """The profile named ``profile_name`` (else ``current``) of an ``aliyun`` CLI config."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CredentialsUnavailable(f"CLI config {str(path)!r} is unreadable") from None
    if not isinstance(config, dict):
        raise CredentialsUnavailable(f"CLI config {str(path)!r} is not a JSON object")
    name = profile_name or config.get("current")
    if not isinstance(name, str) or not name:
        raise CredentialsUnavailable(f"CLI config {str(path)!r} names no current profile")
    profiles = config.get("profiles")
    profile = next(
        (
            p
            for p in (profiles if isinstance(profiles, list) else [])
            if isinstance(p, dict) and p.get("name") == name
        ),
        None,
    )
    if profile is None:
        raise CredentialsUnavailable(f"CLI config {str(path)!r} has no profile {name!r}")
    f = _Fields(profile, f"CLI profile {name!r}")
    mode = profile.get("mode")
    if mode == "AK":
        return StaticSpec(f.required("access_key_id"), f.required("access_key_secret"))
    if mode == "StsToken":
        return StaticSpec(
            f.required("access_key_id"), f.required("access_key_secret"), f.required("sts_token")
        )
    if mode == "RamRoleArn":
        return RamRoleArnSpec(
            access_key_id=f.required("access_key_id"),
            access_key_secret=f.required("access_key_secret"),
            role_arn=f.required("ram_role_arn"),
            role_session_name=f.optional("ram_session_name"),
            duration_seconds=f.duration("expired_seconds"),
            policy=f.optional("policy"),
            external_id=f.optional("external_id"),
            sts_region=f.optional("sts_region"),
            vpc=f.flag("enable_vpc"),
        )
    if mode == "EcsRamRole":
        return EcsRamRoleSpec(f.optional("ram_role_name"))
    if mode == "OIDC":
        return OidcSpec(
            role_arn=f.required("ram_role_arn"),
            oidc_provider_arn=f.required("oidc_provider_arn"),
            token_file=f.required("oidc_token_file"),
            role_session_name=f.optional("role_session_name"),
            duration_seconds=f.duration("expired_seconds"),
            policy=f.optional("policy"),
            sts_region=f.optional("sts_region"),
            vpc=f.flag("enable_vpc"),
        )
    raise CredentialsUnavailable(f"CLI profile {name!r}: unsupported mode {mode!r}")


def _read_ini(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error):
        raise CredentialsUnavailable(f"credentials file {str(path)!r} is unreadable") from None
    # Like the SDK: anything after '#' in a value is a comment.
    return {
        section: {k: v.split("#", 1)[0].strip() for k, v in parser.items(section)}
        for section in parser.sections()
    }


def ini_profile_spec(path: Path, section_name: str) -> ProfileSpec:
    """Section ``section_name`` of an SDK credentials file."""
    section = _read_ini(path).get(section_name)
    if section is None:
        raise CredentialsUnavailable(f"credentials file {str(path)!r} has no [{section_name}]")
    f = _Fields(section, f"credentials file section [{section_name}]")
    kind = section.get("type")
    if kind == "access_key":
        return StaticSpec(f.required("access_key_id"), f.required("access_key_secret"))
    if kind == "ram_role_arn":
        return RamRoleArnSpec(
            access_key_id=f.required("access_key_id"),
            access_key_secret=f.required("access_key_secret"),
            role_arn=f.required("role_arn"),
            role_session_name=f.optional("role_session_name"),
            policy=f.optional("policy"),
        )
    if kind == "oidc_role_arn":
        return OidcSpec(
            role_arn=f.required("role_arn"),
            oidc_provider_arn=f.required("oidc_provider_arn"),
            token_file=f.required("oidc_token_file_path"),
            role_session_name=f.optional("role_session_name"),
            policy=f.optional("policy"),
        )
    if kind == "ecs_ram_role":
        return EcsRamRoleSpec(f.optional("role_name"))
    raise CredentialsUnavailable(
        f"credentials file section [{section_name}]: unsupported type {kind!r}"
    )
