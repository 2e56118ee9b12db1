"""The ECS OpenAPI client for ``DescribeImageSharePermission``: signing, endpoints, the HTTP
exchange and its parsing, retries. Credentials come from ``imageshare_server.credentials``
and the rate limit from ``imageshare_server.ratelimit``, both through protocols."""

from imageshare_server.upstream.client import EcsClient, Limiter, RetryGate, SignatureVersion
from imageshare_server.upstream.endpoints import EndpointResolver
from imageshare_server.upstream.retry import RetryBudget, RetryPolicy, UnlimitedRetries

__all__ = [
    "EcsClient",
    "EndpointResolver",
    "Limiter",
    "RetryBudget",
    "RetryGate",
    "RetryPolicy",
    "SignatureVersion",
    "UnlimitedRetries",
]
