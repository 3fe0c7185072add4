"""Protocol bindings: how an event maps onto a transport's message."""
