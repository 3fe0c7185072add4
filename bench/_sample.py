"""The realistic order event every benchmark uses (an OrderPlaced with the usual extensions)."""

from __future__ import annotations

from typing import Any

import orjson

ATTRIBUTES: dict[str, Any] = {
    "specversion": "1.0",
    "id": "7f9c24e8-3b12-4b8a-9f1e-2a7d5c1e9b40",
    "source": "https://shop.example.com/checkout",
    "type": "com.example.shop.order.placed",
    "time": "2025-03-14T09:26:53.589123Z",
    "datacontenttype": "application/json",
    "dataschema": "https://schemas.example.com/shop/order-placed/v2.json",
    "subject": "orders/ORD-2025-000123",
    "partitionkey": "customer-4711",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}
ORDER: dict[str, Any] = {
    "orderId": "ORD-2025-000123",
    "customer": {"id": "customer-4711", "email": "jane.doe@example.com", "tier": "gold"},
    "items": [
        {"sku": "SKU-1001", "name": "Espresso beans 1kg", "qty": 2, "unitPrice": 24.90},
        {"sku": "SKU-2002", "name": "Milk frother", "qty": 1, "unitPrice": 59.00},
        {"sku": "SKU-3003", "name": "Ceramic cup", "qty": 4, "unitPrice": 8.50},
    ],
    "currency": "EUR",
    "subtotal": 142.80,
    "shipping": {"method": "express", "cost": 6.90,
                 "address": {"street": "Hauptstraße 1", "city": "Berlin", "zip": "10115", "country": "DE"}},
    "total": 149.70,
    "payment": {"method": "card", "authorized": True},
    "placedAt": "2025-03-14T09:26:53.589123Z",
}  # fmt: skip
BODY = orjson.dumps(ORDER)
