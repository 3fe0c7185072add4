"""Protobuf schemas (the official CloudEvents format and the gateway service) and their generated code."""
