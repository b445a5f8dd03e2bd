"""Serving: the fronts, the sidecar around ``decide``, the admin port, hot reload, remote JWKS,
workers, metrics and the decision log. Everything with I/O lives here."""

__all__: list[str] = []
