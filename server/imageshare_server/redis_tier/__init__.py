"""Sharing across replicas through Redis: the L2 cache, read leases, the upstream rate limit.

Optional: loaded only when ``--redis-url`` is set (the ``imageshare-server[redis]``
extra). Every operation is bounded and degrades to the in-process equivalents
when Redis is away. It plugs into the share source as a ``listing.SharedTier``.
"""
