"""Local stand-ins for the push providers, on one TLS server
(:mod:`pushstream.sandbox.server`) with run-time certificates
(:mod:`pushstream.sandbox.certs`)."""
