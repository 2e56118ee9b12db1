"""Metrics, logs and the gRPC server interceptor that feeds them."""
