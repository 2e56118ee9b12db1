"""The gRPC layer: the servicer, its status mapping, response messages, request validation,
health and the listener's TLS."""
