"""Policy as code, offline: lint, policy tests, explain, diff, and the simulator they share.
Tools run the same ``decide`` as the sidecar and never import the serving layer."""

__all__: list[str] = []
