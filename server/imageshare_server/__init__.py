"""imageshare server: a gRPC façade over ECS DescribeImageSharePermission."""

from importlib.metadata import version

# The one place the version lives is the distribution's metadata (pyproject.toml).
__version__ = version("imageshare-server")
