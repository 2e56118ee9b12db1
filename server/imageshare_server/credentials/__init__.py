"""Where the service's Alibaba Cloud credentials come from: the official SDK's default chain.

Environment, OIDC/RRSA through STS, the CLI's config.json, credentials.ini,
the ECS instance RAM role over IMDSv2 and a credentials URI, tried in that
order; temporary credentials are renewed in the background before they
expire. Secrets never appear in a ``repr``.
"""

from imageshare_server.core.credentials import Credentials, CredentialsProvider
from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials._base import StaticCredentialsProvider, credentials_from_env
from imageshare_server.credentials.chain import default_credentials_provider

__all__ = [
    "Credentials",
    "CredentialsProvider",
    "CredentialsUnavailable",
    "StaticCredentialsProvider",
    "credentials_from_env",
    "default_credentials_provider",
]
