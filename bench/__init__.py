"""The project's own benchmark: ``python -m bench`` from the repository root.

It measures the decision core alone, ``policy lint`` on large policies, the gRPC Check service
directly and through the real Envoy (each against an allow-all floor built on the very same
server stack), both fronts (gRPC and HTTP ext_authz) through a client-side Envoy driven by wrk
against the gRPC and the HTTP floor, ``--workers 1`` against ``--workers 2`` (gRPC direct, and
the HTTP front through Envoy), and the resident memory of a worker holding 10,000 rules and a
full subject-token cache. It writes a JSON result and a PNG chart, and prints one JSON summary
object as its last line; ``bench.run.KEYS`` says what each of its keys means. See
docs/performance.md.
"""

SCHEMA = "extauthz-bench/2"
