"""Azure Service Bus TEST DOUBLE (not an emulator) for driving the real ``azure-servicebus`` SDK in tests.

Usage::

    broker = ServiceBusTestBroker().start()          # background thread, 127.0.0.1, free port
    broker.create_queue("orders", lock_duration=2)   # also create_topic / create_subscription
    client = ServiceBusClient.from_connection_string(broker.connection_string)
    ...
    broker.messages("orders"); broker.dead_letters("orders")   # introspection for assertions
    broker.stop()

See :mod:`tests.servicebus_broker.broker` for what it implements and, as important, what it does not.
"""

from .broker import BrokerMessage, ServiceBusTestBroker

__all__ = ["BrokerMessage", "ServiceBusTestBroker"]
