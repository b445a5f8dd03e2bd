"""extauthz: an Envoy ext_authz sidecar that exchanges broad bearer tokens for narrowed ones."""

__version__ = "0.1.0"

__all__ = ["__version__"]
