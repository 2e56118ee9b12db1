"""The credentials chain, every source end to end against loopback stand-ins.

Nothing here may reach 100.100.100.200: every chain is built either with
``ALIBABA_CLOUD_ECS_METADATA_DISABLED=true`` or with the metadata stand-in's URL.
Time is a fake clock the tests move, so "15 minutes before expiry" takes no time;
the STS stand-in's gate holds a response to make a refresh race live calls.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from imageshare_emulator import Emulator
from imageshare_emulator.credentials import CredentialStore
from imageshare_emulator.metadata import MetadataStandIn
from imageshare_emulator.sts import StsStandIn
from imageshare_server.core.credentials import Credentials
from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.chain import (
    ChainCredentialsProvider,
    default_credentials_provider,
)
from imageshare_server.credentials.imds import DEFAULT_METADATA_ENDPOINT, metadata_endpoint
from imageshare_server.credentials.profiles import (
    OidcSpec,
    StaticSpec,
    cli_profile_spec,
    ini_profile_spec,
)
from imageshare_server.credentials.refreshing import (
    ExpiringCredentials,
    RefreshingCredentialsProvider,
)
from imageshare_server.credentials.sts import sts_endpoint
from imageshare_server.upstream.signing import sign_v3

ROLE_ARN = "acs:ram::1234567890123456:role/imageshare-reader"
PROVIDER_ARN = "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c1234"
TOKEN_A = "eyJhbGciOiJSUzI1NiJ9.token-a.signature-a"
TOKEN_B = "eyJhbGciOiJSUzI1NiJ9.token-b.signature-b"
HOUR = 3600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def store() -> CredentialStore:
    return CredentialStore({"LTAI5tSourceKeyId": "SourceKeySecretValue"})


@pytest.fixture
def sts(store: CredentialStore) -> Iterator[StsStandIn]:
    with StsStandIn(accepted_tokens={TOKEN_A}, credential_store=store) as server:
        assert isinstance(server, StsStandIn)
        yield server
        if server.gate is not None:
            server.gate.set()


@pytest.fixture
def imds(store: CredentialStore) -> Iterator[MetadataStandIn]:
    with MetadataStandIn(role_name="imageshare-node", credential_store=store) as server:
        assert isinstance(server, MetadataStandIn)
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "rrsa-token"
    path.write_text(TOKEN_A + "\n")
    return path


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment with no credentials and the metadata service switched off."""
    return {"HOME": str(home), "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", **extra}


def oidc_env(home: Path, sts: StsStandIn, token_file: Path, **extra: str) -> dict[str, str]:
    return base_env(
        home,
        ALIBABA_CLOUD_ROLE_ARN=ROLE_ARN,
        ALIBABA_CLOUD_OIDC_PROVIDER_ARN=PROVIDER_ARN,
        ALIBABA_CLOUD_OIDC_TOKEN_FILE=str(token_file),
        ALIBABA_CLOUD_STS_ENDPOINT=sts.url,
        **extra,
    )


@pytest.fixture
async def chains() -> AsyncIterator[list[ChainCredentialsProvider]]:
    """Chains built by a test, closed afterwards so no refresh outlives it."""
    made: list[ChainCredentialsProvider] = []
    yield made
    for chain in made:
        await chain.aclose()


def build(
    chains: list[ChainCredentialsProvider],
    env: dict[str, str],
    http: httpx.AsyncClient,
    clock: FakeClock | None = None,
    metadata: str | None = None,
) -> ChainCredentialsProvider:
    chain = default_credentials_provider(
        env, http=http, home=Path(env["HOME"]), clock=clock, metadata_endpoint=metadata
    )
    chains.append(chain)
    return chain


def assert_issued_by(creds: Credentials, server: StsStandIn, index: int = -1) -> None:
    issued = server.issued[index]
    assert creds == Credentials(
        issued.access_key_id, issued.access_key_secret, issued.security_token
    )


# --- environment -------------------------------------------------------------------------


async def test_environment_access_key_and_sts_token(
    tmp_path: Path, http: httpx.AsyncClient, chains: list[ChainCredentialsProvider]
) -> None:
    env = base_env(
        tmp_path,
        ALIBABA_CLOUD_ACCESS_KEY_ID="LTAI5tEnvKey",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="EnvSecretValue",
        ALIBABA_CLOUD_SECURITY_TOKEN="EnvStsTokenValue",
    )
    chain = build(chains, env, http)
    assert chain.describe() == "pending: env"
    assert await chain.get() == Credentials("LTAI5tEnvKey", "EnvSecretValue", "EnvStsTokenValue")
    assert chain.describe() == "env"


# --- OIDC / RRSA -------------------------------------------------------------------------


async def test_oidc_exchanges_the_token_file_at_sts(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    env = oidc_env(tmp_path, sts, token_file, ALIBABA_CLOUD_ROLE_SESSION_NAME="pod-abc")
    chain = build(chains, env, http)
    creds = await chain.get()
    assert_issued_by(creds, sts)
    assert creds.security_token
    assert creds.access_key_id.startswith("STS.")
    assert chain.describe() == "oidc_role_arn"
    [call] = sts.calls
    assert {k: v for k, v in call.items() if k != "Timestamp"} == {
        "Action": "AssumeRoleWithOIDC",
        "Version": "2015-04-01",
        "Format": "JSON",
        "DurationSeconds": "3600",
        "RoleArn": ROLE_ARN,
        "OIDCProviderArn": PROVIDER_ARN,
        "OIDCToken": TOKEN_A,
        "RoleSessionName": "pod-abc",
    }
    assert call["Timestamp"].endswith("Z")
    # Cached: no second exchange while fresh.
    assert await chain.get() == creds
    assert sts.call_count == 1


async def test_oidc_default_session_name(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    await build(chains, oidc_env(tmp_path, sts, token_file), http).get()
    assert sts.calls[0]["RoleSessionName"].startswith("imageshare-")


async def test_token_file_rotation_reaches_the_next_refresh(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, token_file), http, clock)
    first = await chain.get()
    # The kubelet rotates the projected token; STS now only accepts the new one.
    await asyncio.to_thread(token_file.write_text, TOKEN_B)
    with sts.lock:
        sts.accepted_tokens = {TOKEN_B}
    clock.advance(HOUR - 15 * 60 + 1)
    assert await chain.get() == first  # still valid: served at once, refresh in background
    await chain.settle()
    second = await chain.get()
    assert second != first
    assert_issued_by(second, sts)
    assert [c["OIDCToken"] for c in sts.calls] == [TOKEN_A, TOKEN_B]


async def test_every_secret_reaches_the_redactor_before_use(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    secrets_seen: list[str] = []
    chain = default_credentials_provider(
        oidc_env(tmp_path, sts, token_file),
        http=http,
        home=tmp_path,
        clock=clock,
        on_secret=secrets_seen.append,
    )
    try:
        first = await chain.get()
        await chain.get()
        assert secrets_seen == [TOKEN_A, first.access_key_secret, first.security_token]
        clock.advance(HOUR)
        second = await chain.get()
        assert secrets_seen[3:] == [TOKEN_A, second.access_key_secret, second.security_token]
    finally:
        await chain.aclose()


async def test_refresh_before_expiry_never_blocks_concurrent_calls(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, token_file), http, clock)
    first = await chain.get()
    sts.gate = threading.Event()  # STS holds its answer until released
    sts.request_arrived.clear()
    clock.advance(HOUR - 10 * 60)
    # While the refresh is held at STS, every caller gets the valid credentials at once.
    results = await asyncio.wait_for(asyncio.gather(*(chain.get() for _ in range(50))), 5)
    assert all(r == first for r in results)
    assert await asyncio.to_thread(sts.request_arrived.wait, 5)
    results = await asyncio.wait_for(asyncio.gather(*(chain.get() for _ in range(50))), 5)
    assert all(r == first for r in results)
    sts.gate.set()
    await asyncio.wait_for(chain.settle(), 5)
    assert sts.call_count == 2  # exactly one exchange for the refresh
    refreshed = await chain.get()
    assert_issued_by(refreshed, sts)
    assert refreshed != first
    assert sts.call_count == 2


async def test_expired_credentials_make_callers_share_one_exchange(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, token_file), http, clock)
    first = await chain.get()
    clock.advance(HOUR)  # past expiry: nobody may sign with the old credentials
    results = await asyncio.wait_for(asyncio.gather(*(chain.get() for _ in range(30))), 5)
    assert sts.call_count == 2
    assert all(r == results[0] for r in results)
    assert results[0] != first
    assert_issued_by(results[0], sts)


async def test_failed_refresh_keeps_valid_credentials_and_retries_later(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, token_file), http, clock)
    first = await chain.get()
    sts.fail_next(1)
    clock.advance(HOUR - 10 * 60)
    assert await chain.get() == first
    await chain.settle()
    assert sts.call_count == 2
    # Within the backoff the old credentials are served without asking STS again.
    assert await chain.get() == first
    await chain.settle()
    assert sts.call_count == 2
    clock.advance(2)
    assert await chain.get() == first
    await chain.settle()
    assert sts.call_count == 3
    refreshed = await chain.get()
    assert refreshed != first
    assert_issued_by(refreshed, sts)


async def test_close_does_not_wait_for_a_stuck_refresh(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
) -> None:
    chain = default_credentials_provider(
        oidc_env(tmp_path, sts, token_file), http=http, home=tmp_path, clock=clock
    )
    await chain.get()
    sts.gate = threading.Event()
    sts.request_arrived.clear()
    clock.advance(HOUR - 10 * 60)
    await chain.get()
    assert await asyncio.to_thread(sts.request_arrived.wait, 5)
    await asyncio.wait_for(chain.aclose(), 2)  # STS still holds its answer


async def test_short_sessions_refresh_at_half_life_not_on_every_call() -> None:
    clock = FakeClock()
    fetched: list[float] = []

    async def fetch() -> ExpiringCredentials:
        fetched.append(clock.now)
        return ExpiringCredentials(Credentials(f"STS.{len(fetched)}", "s", "t"), clock.now + 900)

    provider = RefreshingCredentialsProvider(fetch, name="short", clock=clock)
    assert (await provider.get()).access_key_id == "STS.1"
    clock.advance(400)
    assert (await provider.get()).access_key_id == "STS.1"
    await provider.settle()
    assert len(fetched) == 1
    clock.advance(100)
    assert (await provider.get()).access_key_id == "STS.1"
    await provider.settle()
    assert (await provider.get()).access_key_id == "STS.2"
    await provider.aclose()


async def test_expired_and_sts_down_raises_without_secrets(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, token_file), http, clock)
    first = await chain.get()
    with sts.lock:
        sts.accepted_tokens = set()
    clock.advance(HOUR)
    with pytest.raises(CredentialsUnavailable) as caught:
        await chain.get()
    message = str(caught.value)
    assert "AuthenticationFail.OIDCToken.Invalid" in message
    for secret in (TOKEN_A, first.access_key_secret, first.security_token or "<none>"):
        assert secret not in message
        assert secret not in repr(caught.value)
    assert caught.value.__cause__ is None


async def test_oidc_with_a_missing_token_file_falls_through_and_says_why(
    tmp_path: Path, sts: StsStandIn, http: httpx.AsyncClient, chains: list[ChainCredentialsProvider]
) -> None:
    chain = build(chains, oidc_env(tmp_path, sts, tmp_path / "absent"), http)
    with pytest.raises(
        CredentialsUnavailable, match=r"oidc_role_arn: OIDC token file .* unreadable"
    ):
        await chain.get()
    assert sts.call_count == 0


def test_sts_endpoint_resolution() -> None:
    assert sts_endpoint({}) == "https://sts.aliyuncs.com"
    assert sts_endpoint({"ALIBABA_CLOUD_STS_REGION": "cn-hangzhou"}) == (
        "https://sts.cn-hangzhou.aliyuncs.com"
    )
    vpc = {"ALIBABA_CLOUD_STS_REGION": "cn-beijing", "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED": "true"}
    assert sts_endpoint(vpc) == "https://sts-vpc.cn-beijing.aliyuncs.com"
    assert sts_endpoint({}, region="ap-southeast-1", vpc=True) == (
        "https://sts-vpc.ap-southeast-1.aliyuncs.com"
    )
    explicit = {"ALIBABA_CLOUD_STS_ENDPOINT": "sts-vpc.cn-shanghai.aliyuncs.com", **vpc}
    assert sts_endpoint(explicit) == "https://sts-vpc.cn-shanghai.aliyuncs.com"
    assert sts_endpoint({"ALIBABA_CLOUD_STS_ENDPOINT": "http://127.0.0.1:8080/"}) == (
        "http://127.0.0.1:8080"
    )
    with pytest.raises(CredentialsUnavailable):
        sts_endpoint({"ALIBABA_CLOUD_STS_REGION": "cn-hangzhou.evil.example/"})


# --- CLI profile -------------------------------------------------------------------------


def write_cli_config(home: Path, current: str, profiles: list[dict[str, object]]) -> Path:
    path = home / ".aliyun" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"current": current, "profiles": profiles}))
    return path


async def test_cli_profile_modes(
    tmp_path: Path,
    sts: StsStandIn,
    imds: MetadataStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    write_cli_config(
        tmp_path,
        "ak",
        [
            {"name": "ak", "mode": "AK", "access_key_id": "LTAI5tCli", "access_key_secret": "CliS"},
            {
                "name": "sts",
                "mode": "StsToken",
                "access_key_id": "STS.Cli",
                "access_key_secret": "CliStsS",
                "sts_token": "CliStsToken",
            },
            {
                "name": "rrsa",
                "mode": "OIDC",
                "ram_role_arn": ROLE_ARN,
                "oidc_provider_arn": PROVIDER_ARN,
                "oidc_token_file": str(token_file),
                "role_session_name": "cli-session",
            },
            {"name": "node", "mode": "EcsRamRole", "ram_role_name": "imageshare-node"},
        ],
    )
    env = base_env(tmp_path, ALIBABA_CLOUD_STS_ENDPOINT=sts.url)
    chain = build(chains, env, http)
    assert await chain.get() == Credentials("LTAI5tCli", "CliS")
    assert chain.describe() == "cli_profile/access_key"

    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "sts"}, http)
    assert await chain.get() == Credentials("STS.Cli", "CliStsS", "CliStsToken")
    assert chain.describe() == "cli_profile/sts_token"

    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "rrsa"}, http)
    assert_issued_by(await chain.get(), sts)
    assert sts.calls[-1]["RoleSessionName"] == "cli-session"
    assert chain.describe() == "cli_profile/oidc_role_arn"

    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "node"}, http, metadata=imds.url)
    creds = await chain.get()
    assert creds.access_key_id == imds.current.access_key_id
    assert chain.describe() == "cli_profile/ecs_ram_role"
    assert imds.calls["GET /latest/meta-data/ram/security-credentials/"] == 0  # role was named


def test_cli_profile_errors_name_the_key_not_the_value(tmp_path: Path) -> None:
    path = write_cli_config(
        tmp_path,
        "half",
        [{"name": "half", "mode": "AK", "access_key_id": "", "access_key_secret": "TopSecret"}],
    )
    with pytest.raises(CredentialsUnavailable, match="access_key_id is missing") as caught:
        cli_profile_spec(path, None)
    assert "TopSecret" not in str(caught.value)
    with pytest.raises(CredentialsUnavailable, match="no profile 'other'"):
        cli_profile_spec(path, "other")
    path.write_text(json.dumps({"current": "x", "profiles": [{"name": "x", "mode": "OAuth"}]}))
    with pytest.raises(CredentialsUnavailable, match="unsupported mode 'OAuth'"):
        cli_profile_spec(path, None)


# --- INI credentials file ----------------------------------------------------------------


def write_ini(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


async def test_ini_file_types(
    tmp_path: Path,
    sts: StsStandIn,
    imds: MetadataStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    write_ini(
        tmp_path / ".alibabacloud" / "credentials.ini",
        "[default]\n"
        "type = access_key  # a comment\n"
        "access_key_id = LTAI5tIni\n"
        "access_key_secret = IniSecret\n"
        "[rrsa]\n"
        "type = oidc_role_arn\n"
        f"role_arn = {ROLE_ARN}\n"
        f"oidc_provider_arn = {PROVIDER_ARN}\n"
        f"oidc_token_file_path = {token_file}\n"
        "[node]\n"
        "type = ecs_ram_role\n"
        "[assume]\n"
        "type = ram_role_arn\n"
        "access_key_id = LTAI5tSourceKeyId\n"
        "access_key_secret = SourceKeySecretValue\n"
        f"role_arn = {ROLE_ARN}\n"
        "role_session_name = ini-assume\n",
    )
    env = base_env(tmp_path, ALIBABA_CLOUD_STS_ENDPOINT=sts.url)
    chain = build(chains, env, http)
    assert await chain.get() == Credentials("LTAI5tIni", "IniSecret")
    assert chain.describe() == "profile/access_key"

    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "rrsa"}, http)
    assert_issued_by(await chain.get(), sts)
    assert sts.calls[-1]["OIDCToken"] == TOKEN_A

    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "node"}, http, metadata=imds.url)
    assert (await chain.get()).access_key_id == imds.current.access_key_id
    assert imds.calls["GET /latest/meta-data/ram/security-credentials/"] == 1  # discovered

    # ram_role_arn: AssumeRole, V1-signed with the file's key, verified by the stand-in.
    chain = build(chains, {**env, "ALIBABA_CLOUD_PROFILE": "assume"}, http)
    assert_issued_by(await chain.get(), sts)
    call = sts.calls[-1]
    assert call["Action"] == "AssumeRole"
    assert call["AccessKeyId"] == "LTAI5tSourceKeyId"
    assert call["RoleSessionName"] == "ini-assume"
    assert "SourceKeySecretValue" not in json.dumps(sts.calls)


async def test_ini_file_from_environment_variable_and_bad_signature(
    tmp_path: Path, sts: StsStandIn, http: httpx.AsyncClient, chains: list[ChainCredentialsProvider]
) -> None:
    path = write_ini(
        tmp_path / "elsewhere.ini",
        "[default]\ntype = ram_role_arn\naccess_key_id = LTAI5tSourceKeyId\n"
        f"access_key_secret = WrongSecretValue\nrole_arn = {ROLE_ARN}\n",
    )
    env = base_env(
        tmp_path, ALIBABA_CLOUD_CREDENTIALS_FILE=str(path), ALIBABA_CLOUD_STS_ENDPOINT=sts.url
    )
    chain = build(chains, env, http)
    with pytest.raises(CredentialsUnavailable, match="SignatureDoesNotMatch") as caught:
        await chain.get()
    assert "WrongSecretValue" not in str(caught.value)


def test_ini_spec_parsing(tmp_path: Path) -> None:
    path = write_ini(
        tmp_path / "c.ini",
        "[default]\ntype = access_key\naccess_key_id = a\naccess_key_secret = s3cr3t\n"
        "[o]\ntype = oidc_role_arn\nrole_arn = r\noidc_provider_arn = p\n"
        "oidc_token_file_path = /t\n[x]\ntype = rsa_key_pair\n",
    )
    spec = ini_profile_spec(path, "default")
    assert spec == StaticSpec("a", "s3cr3t")
    assert "s3cr3t" not in repr(spec)
    assert ini_profile_spec(path, "o") == OidcSpec("r", "p", "/t")
    with pytest.raises(CredentialsUnavailable, match="unsupported type 'rsa_key_pair'"):
        ini_profile_spec(path, "x")
    with pytest.raises(CredentialsUnavailable, match=r"has no \[missing\]"):
        ini_profile_spec(path, "missing")


# --- ECS instance RAM role (IMDSv2) --------------------------------------------------------


async def test_ecs_ram_role_via_imdsv2(
    tmp_path: Path,
    imds: MetadataStandIn,
    http: httpx.AsyncClient,
    clock: FakeClock,
    chains: list[ChainCredentialsProvider],
) -> None:
    env = {"HOME": str(tmp_path)}
    chain = build(chains, env, http, clock, metadata=imds.url)
    assert chain.candidates == ["ecs_ram_role"]
    creds = await chain.get()
    doc = imds.document()
    assert creds == Credentials(doc["AccessKeyId"], doc["AccessKeySecret"], doc["SecurityToken"])
    assert chain.describe() == "ecs_ram_role"
    assert imds.calls["PUT /latest/api/token"] == 1
    assert imds.calls["GET /latest/meta-data/ram/security-credentials/imageshare-node"] == 1

    # ECS rotates the role's credentials; our refresh picks up the new ones.
    rotated = imds.rotate()
    clock.advance(6 * HOUR - 14 * 60)
    assert await chain.get() == creds
    await chain.settle()
    assert (await chain.get()).access_key_id == rotated.access_key_id
    assert imds.calls["PUT /latest/api/token"] == 2


async def test_metadata_stand_in_rejects_reads_without_a_valid_token(
    imds: MetadataStandIn, http: httpx.AsyncClient
) -> None:
    path = f"{imds.url}/latest/meta-data/ram/security-credentials/imageshare-node"
    assert (await http.get(path)).status_code == 403
    bad = {"X-aliyun-ecs-metadata-token": "forged"}
    assert (await http.get(path, headers=bad)).status_code == 401
    assert (await http.put(f"{imds.url}/latest/api/token")).status_code == 400
    proxied = {"X-aliyun-ecs-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.1"}
    assert (await http.put(f"{imds.url}/latest/api/token", headers=proxied)).status_code == 403


async def test_metadata_endpoint_defaults_and_override() -> None:
    assert metadata_endpoint({}) == DEFAULT_METADATA_ENDPOINT
    assert metadata_endpoint({"ALIBABA_CLOUD_ECS_METADATA_ENDPOINT": "127.0.0.1:9"}) == (
        "http://127.0.0.1:9"
    )
    assert metadata_endpoint({}, "http://127.0.0.1:8/") == "http://127.0.0.1:8"


# --- credentials URI ---------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_credentials_uri(
    tmp_path: Path,
    imds: MetadataStandIn,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    uri = f"{imds.url}/credentials/imageshare-node"
    chain = build(chains, base_env(tmp_path, ALIBABA_CLOUD_CREDENTIALS_URI=uri), http)
    assert chain.candidates == ["credentials_uri"]
    assert (await chain.get()).access_key_id == imds.current.access_key_id
    assert chain.describe() == "credentials_uri"


async def test_no_metadata_service_falls_through_to_credentials_uri(
    tmp_path: Path,
    imds: MetadataStandIn,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    env = {
        "HOME": str(tmp_path),
        "ALIBABA_CLOUD_CREDENTIALS_URI": f"{imds.url}/credentials/imageshare-node",
    }
    chain = build(chains, env, http, metadata=f"http://127.0.0.1:{closed_port()}")
    assert chain.candidates == ["ecs_ram_role", "credentials_uri"]
    assert (await chain.get()).access_key_id == imds.current.access_key_id
    assert chain.describe() == "credentials_uri"


# --- precedence and failure ----------------------------------------------------------------


async def test_chain_order(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    write_cli_config(
        tmp_path,
        "ak",
        [{"name": "ak", "mode": "AK", "access_key_id": "LTAI5tCli", "access_key_secret": "S1"}],
    )
    write_ini(
        tmp_path / ".alibabacloud" / "credentials.ini",
        "[default]\ntype = access_key\naccess_key_id = LTAI5tIni\naccess_key_secret = S2\n",
    )
    env = oidc_env(
        tmp_path,
        sts,
        token_file,
        ALIBABA_CLOUD_ACCESS_KEY_ID="LTAI5tEnv",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="S0",
        ALIBABA_CLOUD_CREDENTIALS_URI="http://127.0.0.1:1/never",
    )
    env.pop("ALIBABA_CLOUD_ECS_METADATA_DISABLED")
    chain = build(chains, env, http, metadata=f"http://127.0.0.1:{closed_port()}")
    assert chain.candidates == [
        "env",
        "oidc_role_arn",
        "cli_profile",
        "profile",
        "ecs_ram_role",
        "credentials_uri",
    ]
    assert (await chain.get()).access_key_id == "LTAI5tEnv"

    del env["ALIBABA_CLOUD_ACCESS_KEY_ID"]
    chain = build(chains, env, http)
    assert_issued_by(await chain.get(), sts)

    env = base_env(tmp_path)
    assert (await build(chains, env, http).get()).access_key_id == "LTAI5tCli"
    env["ALIBABA_CLOUD_CLI_PROFILE_DISABLED"] = "true"
    assert (await build(chains, env, http).get()).access_key_id == "LTAI5tIni"


async def test_broken_source_falls_through_to_the_next(
    tmp_path: Path, http: httpx.AsyncClient, chains: list[ChainCredentialsProvider]
) -> None:
    write_cli_config(tmp_path, "gone", [])
    write_ini(
        tmp_path / ".alibabacloud" / "credentials.ini",
        "[default]\ntype = access_key\naccess_key_id = LTAI5tIni\naccess_key_secret = S2\n",
    )
    chain = build(chains, base_env(tmp_path), http)
    assert (await chain.get()).access_key_id == "LTAI5tIni"
    assert chain.describe() == "profile/access_key"


async def test_nothing_configured(
    tmp_path: Path, http: httpx.AsyncClient, chains: list[ChainCredentialsProvider]
) -> None:
    chain = build(chains, base_env(tmp_path), http)
    assert chain.describe() == "pending: no source configured"
    with pytest.raises(CredentialsUnavailable, match="no credentials source is configured"):
        await chain.get()


def test_secrets_stay_out_of_repr_and_str() -> None:
    creds = Credentials("LTAI5tVisible", "HiddenSecret", "HiddenToken")
    for text in (repr(creds), str(creds)):
        assert "LTAI5tVisible" in text
        assert "HiddenSecret" not in text
        assert "HiddenToken" not in text


# --- end to end: STS-issued credentials sign a real call -----------------------------------


async def test_sts_credentials_sign_a_call_the_emulator_accepts(
    tmp_path: Path,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
) -> None:
    with (
        Emulator(credentials={}) as emu,
        StsStandIn(accepted_tokens={TOKEN_A}, credential_store=emu.credential_store) as sts,
    ):
        assert isinstance(sts, StsStandIn)
        chain = build(chains, oidc_env(tmp_path, sts, token_file), http)

        async def describe(creds: Credentials) -> httpx.Response:
            query = {"RegionId": "cn-hangzhou", "ImageId": "m-demo0000002"}
            headers = sign_v3(
                method="GET",
                host=f"127.0.0.1:{emu.port}",
                action="DescribeImageSharePermission",
                version="2014-05-26",
                query=query,
                credentials=creds,
            )
            return await http.get(f"{emu.url}/", params=query, headers=headers)

        creds = await chain.get()
        response = await describe(creds)
        assert response.status_code == 200, response.text
        assert response.json()["ShareGroups"] == {"ShareGroup": [{"Group": "all"}]}
        # The emulator checks the STS token that travels with temporary credentials.
        forged = Credentials(creds.access_key_id, creds.access_key_secret, "CAISforged")
        assert (await describe(forged)).status_code != 200


@pytest.mark.parametrize(
    ("variable", "value", "code"),
    [
        ("ALIBABA_CLOUD_ROLE_ARN", "acs:ram::123:role/x", "InvalidParameter.RoleArn"),
        ("ALIBABA_CLOUD_OIDC_PROVIDER_ARN", "arn:bad", "InvalidParameter.OIDCProviderArn"),
    ],
)
async def test_sts_stand_in_rejects_malformed_arns(
    tmp_path: Path,
    sts: StsStandIn,
    token_file: Path,
    http: httpx.AsyncClient,
    chains: list[ChainCredentialsProvider],
    variable: str,
    value: str,
    code: str,
) -> None:
    env = {**oidc_env(tmp_path, sts, token_file), variable: value}
    with pytest.raises(CredentialsUnavailable, match=f"HTTP 400 {code}"):
        await build(chains, env, http).get()
    assert sts.issued == []
