"""Azure Service Bus test double (NOT an emulator) for driving the real azure-servicebus SDK in tests.

See :mod:`tests.servicebus_broker.broker` for what it implements and what it does not.
"""

from .broker import BrokerMessage, ServiceBusTestBroker

__all__ = ["BrokerMessage", "ServiceBusTestBroker"]
