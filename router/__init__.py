"""The router: route, destination and policy model; filters; decisions."""
