"""UMCEF fabric: event model, codecs, pipeline, ingress servers, SDK, config and CLI."""
