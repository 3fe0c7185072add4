"""Event formats: JSON (with batches) and protobuf."""
