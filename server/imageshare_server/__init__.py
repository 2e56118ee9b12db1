"""imageshare server: a gRPC façade over ECS DescribeImageSharePermission."""

__version__ = "0.1.0"
