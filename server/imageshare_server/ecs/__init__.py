"""The upstream ECS OpenAPI client: signing, endpoints, credentials, transport."""
