"""Sharing across replicas through Redis: the L2 cache, read leases, the upstream rate limit.

Optional: loaded only when ``--redis-url`` is set. Every operation is bounded
and degrades to the in-process equivalents when Redis is away.
"""
