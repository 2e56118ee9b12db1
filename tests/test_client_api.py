"""The Python client's public API is exactly what is listed here, importable and documented.

Like encode/httpx's test of its exported members: adding, removing or renaming a public name
is a deliberate change made here too (and in the changelog), never a side effect of a
refactoring. Classes and functions carry docstrings of their own; the constants are
documented by value in clients/README.md, so their values are checked against it.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import types
from pathlib import Path
from typing import Any

import imageshare_client

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_README = ROOT / "clients" / "README.md"

PUBLIC_API = [
    "DEFAULT_SERVICE_CONFIG",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncImageShareClient",
    "AsyncShareListing",
    "AsyncShareWatch",
    "CacheStatus",
    "FieldViolation",
    "ImageShareClient",
    "ImageShareError",
    "ListingMetadata",
    "RetryPolicy",
    "ShareChange",
    "ShareCheck",
    "ShareList",
    "ShareListing",
    "ShareVia",
    "ShareWatch",
    "SharedAccount",
    "StreamInterruptedError",
    "channel_options",
]
CONSTANTS = {"DEFAULT_SERVICE_CONFIG", "DEFAULT_TIMEOUT", "NO_RETRY"}


def test_all_lists_exactly_the_public_api() -> None:
    assert imageshare_client.__all__ == PUBLIC_API


def test_every_public_member_is_listed_in_all() -> None:
    """Nothing public escapes ``__all__`` (submodules aside: they are import paths)."""
    public = {
        name
        for name, value in vars(imageshare_client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(PUBLIC_API)


def test_star_import_gives_exactly_the_public_api() -> None:
    namespace: dict[str, Any] = {}
    exec("from imageshare_client import *", namespace)  # noqa: S102
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert namespace[name] is getattr(imageshare_client, name)


def test_classes_and_functions_are_the_packages_own_and_documented() -> None:
    for name in sorted(set(PUBLIC_API) - CONSTANTS):
        value = getattr(imageshare_client, name)
        assert inspect.isclass(value) or inspect.isfunction(value), name
        assert value.__module__.startswith("imageshare_client."), name
        # Its own docstring: not inherited (inspect.getdoc would), not a dataclass's
        # generated "Name(field: type, ...)" signature.
        doc = vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__
        assert isinstance(doc, str), f"{name} has no docstring"
        assert doc.strip(), f"{name} has an empty docstring"
        assert not doc.startswith(f"{name}("), f"{name} has only a generated docstring"


def _documented_service_config() -> Any:
    """The JSON block clients/README.md calls the recommended service config."""
    text = CLIENTS_README.read_text()
    after = text.split("The recommended gRPC service config", 1)[1]
    match = re.search(r"```json\n(.*?)```", after, re.DOTALL)
    assert match is not None
    return json.loads(match.group(1))


def test_default_service_config_is_the_documented_one() -> None:
    """clients/README.md: "The recommended gRPC service config (the Python and Node clients
    set exactly this)"."""
    config = imageshare_client.DEFAULT_SERVICE_CONFIG
    assert json.loads(json.dumps(config)) == _documented_service_config()
    # ... and it is what a channel built with the defaults carries.
    options = dict(imageshare_client.channel_options())
    assert json.loads(options["grpc.service_config"]) == _documented_service_config()
    assert "grpc.service_config" not in dict(imageshare_client.channel_options(None))


def test_default_timeout_and_retry_policies_are_the_documented_ones() -> None:
    """clients/README.md: "a 10 s deadline per listing ... the client's own retry loop
    (`RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=2.0)`...)"."""
    text = CLIENTS_README.read_text()
    assert "Defaults: a 10 s deadline per listing" in text
    assert imageshare_client.DEFAULT_TIMEOUT == 10.0
    documented = re.search(r"`(RetryPolicy\([^`]*\))`", text)
    assert documented is not None
    call = ast.parse(documented.group(1), mode="eval").body
    assert isinstance(call, ast.Call)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    assert imageshare_client.RetryPolicy() == imageshare_client.RetryPolicy(**kwargs)
    # NO_RETRY: one attempt, so the client's own loop never retries.
    assert imageshare_client.NO_RETRY.max_attempts == 1
    assert imageshare_client.RetryPolicy(max_attempts=1) == imageshare_client.NO_RETRY
    # The documented keepalive: a 30 s ping while calls are active, a 10 s timeout.
    options = dict(imageshare_client.channel_options())
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
