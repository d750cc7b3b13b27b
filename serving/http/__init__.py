"""The HTTP app: a short factory, blueprints per concern, auth, request bodies, errors, the OpenAPI document."""
