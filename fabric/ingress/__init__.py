"""Ingress servers: HTTP and gRPC."""
