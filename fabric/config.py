"""Gateway configuration: one YAML file plus `UMCEF_*` environment overrides, validated with exact messages.

Environment overrides use `__` for nesting: `UMCEF_SERVER__PORT=9000`, `UMCEF_DATA_DIR=/var/lib/umcef`.
Values are parsed as YAML scalars, so `UMCEF_STORE__SYNC=normal` and `UMCEF_LIMITS__MAX_BATCH=50` work.
Only variables whose first part names a top-level key are overrides: other `UMCEF_*` variables belong to
someone else (`UMCEF_SERVICEBUS_CONNECTION_STRING` to the Service Bus adapter, `UMCEF_PURE` to the
native switch, the test harness's own) and must not stop the gateway from starting. A near miss of an
override (`UMCEF_SERVER_PORT`, `UMCEF_LIMIT__MAX_BATCH`) is still an error, with what it probably meant.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from umcef.fabric.limits import DEFAULT_LIMITS, Limits
from umcef.router.model import Route, RoutingConfig

ENV_PREFIX = "UMCEF_"
TOP_LEVEL_KEYS = ("data_dir", "server", "limits", "store", "dedup", "backpressure", "destinations", "routes",
                  "default", "sources", "residency", "router", "delivery")
DEFAULT_TOPIC = "default"
KNOWN_SCHEMES = ("local", "kafka", "sqs", "pubsub", "servicebus")


class ConfigError(ValueError):
    """A configuration mistake: where it is (file and key path) and what was expected."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source = source
        self.path = path
        self.reason = reason
        super().__init__(f"{source}: {path}: {reason}" if path else f"{source}: {reason}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = 8081  # None disables gRPC ingress


DEFAULTS_SOURCE = "(defaults)"  # Config.source without a configuration file
SYNC_POLICIES = ("full", "normal", "interval")  # store.sync (docs/local-store.md, "Durability contract")
MAX_FSYNC_INTERVAL_MS = 1000


@dataclass(frozen=True, slots=True)
class StoreConfig:
    sync: str = "full"
    max_age_seconds: float | None = 7 * 24 * 3600
    max_events_per_topic: int | None = None
    fsync_interval_ms: float = 5.0  # sync: interval only: the store fsyncs the WAL at most this often

    @property
    def fsync_interval(self) -> float:
        """`fsync_interval_ms` in seconds, as LocalStore takes it."""
        return self.fsync_interval_ms / 1000


@dataclass(frozen=True, slots=True)
class DedupConfig:
    store: str = "memory"  # memory: this instance only; redis: shared by every instance using `url`
    url: str | None = None
    window_seconds: float = 600.0
    max_entries: int = 1_000_000  # memory store only


@dataclass(frozen=True, slots=True)
class SpoolLimit:
    """One remote destination's own watermarks (`destinations.<name>.max_spooled_events/_bytes`)."""

    max_spooled_events: int | None = None
    max_spooled_bytes: int | None = None


PRIORITY_CLASSES = ("low", "normal", "high")
MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024  # 64 requests at the default max_body_bytes
# The spools are bounded unless told otherwise (null): a destination that is down for long fills the disk
# otherwise, and ingress never pushes back. A million events is ~1 GB at 1 KB each.
MAX_SPOOLED_EVENTS = 1_000_000
SHED_NORMAL_AT = 0.9  # high priority keeps the last tenth of a watermark to itself
SPOOL_LIMIT_KEYS = ("max_spooled_events", "max_spooled_bytes")


@dataclass(frozen=True, slots=True)
class BackpressureConfig:
    max_spooled_events: int | None = MAX_SPOOLED_EVENTS  # undelivered events in the delivery spools; None: unbounded
    max_spooled_bytes: int | None = None  # their encoded size
    retry_after_seconds: float = 1.0
    shed_low_at: float = 0.5  # low priority is refused above this fraction of a watermark
    shed_normal_at: float = SHED_NORMAL_AT  # normal above this one (1: the watermark, as for high)
    max_in_flight_bytes: int | None = MAX_IN_FLIGHT_BYTES  # request bodies (HTTP) and messages (gRPC) held
    destinations: dict[str, SpoolLimit] = field(default_factory=dict)  # per remote destination
    route_classes: dict[str, str] = field(default_factory=dict)  # routes[].priority_class by route name


DEAD_LETTER = "_deadletter"  # the local dead-letter topic (`umcef dlq` reads it)
DELIVERY_KEYS = ("max_attempts", "max_age_seconds", "backoff_base_seconds", "backoff_cap_seconds", "dead_letter",
                 "pages_in_flight", "memory_events", "pace_above_events")


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """Retry limits of one destination's delivery worker (`delivery:` defaults, overridden per destination)."""

    max_attempts: int | None = None  # publish attempts before dead-lettering; None: no limit
    max_age_seconds: float | None = 86400.0  # since the event was accepted (spooled); None: no limit
    backoff_base_seconds: float = 0.1
    backoff_cap_seconds: float = 30.0
    dead_letter: str = DEAD_LETTER  # `_deadletter` (local topic) or a configured destination name
    pages_in_flight: int = 4  # pages published at once (pages sharing a partitionkey wait for each other)
    memory_events: int = 20_000  # spooled events handed to the worker in memory before it reads the store
    # Ingress pacing: with ingress more than this many events ahead of a worker that is delivering (accepted for
    # its destination beyond what left the spool), a publish to it waits (once durable) for the worker to catch
    # up; None: never (umcef.fabric.pacing, docs/delivery.md).
    pace_above_events: int | None = 5_000


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    defaults: DeliveryLimits = DeliveryLimits()
    drain_seconds: float = 5.0  # graceful shutdown: how long in-flight deliveries may take to finish
    # Delivery workers in a second process (the spool is shared through the store): ingress gets this
    # process's interpreter to itself, so a gateway uses two cores instead of one.
    process: bool = False


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    url: str
    scheme: str
    topic: str  # local:// destinations: their topic; remote ones: the local spool topic they drain
    options: dict[str, Any] = field(default_factory=dict)  # adapter options (client settings, never secrets)
    delivery: DeliveryLimits = DeliveryLimits()  # the `delivery:` defaults merged with this destination's own

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    max_in_flight: int = 64


RouteConfig = Route  # the router's model of a route (name, filter, to, mode, weights, ...)


@dataclass(frozen=True, slots=True)
class Config:
    source: str = DEFAULTS_SOURCE
    data_dir: Path = Path("umcef-data")
    server: ServerConfig = ServerConfig()
    limits: Limits = DEFAULT_LIMITS
    store: StoreConfig = StoreConfig()
    dedup: DedupConfig = DedupConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    default_destination: str = "default"
    sources: tuple[SourceConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # routes, residency, destinations' routing attributes
    delivery: DeliveryConfig = DeliveryConfig()


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         labels: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate everything. A mistake in an overridden
    value is blamed on its variable, or on what `labels` calls that variable (the CLI: its flag)."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else DEFAULTS_SOURCE
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read the file: {exc.strerror or exc}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(source, "", f"{where}not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {_kind(raw)}")
    overridden = _apply_env(raw, env)
    return _Parser(source, {path: (labels or {}).get(key, f"environment {key}")
                            for path, key in overridden.items()}).config(raw)


def from_mapping(raw: dict[str, Any], source: str = "(inline)") -> Config:
    """Validate an already-parsed configuration mapping (the demo and tests build theirs in code)."""
    return _Parser(source).config(raw)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Applies the overrides to `raw`; returns the key path of each overridden value -> its variable."""
    overridden: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        if parts[0] not in TOP_LEVEL_KEYS:
            meant = _meant_override(parts)
            if meant:  # a near miss of an override is a mistake to report, not someone else's variable
                raise ConfigError(f"environment {key}", "", f"not a configuration key; did you mean {meant}?")
            continue
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {key}", ".".join(parts), "overrides a key that is not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            node[parts[-1]] = value
        overridden[".".join(parts)] = key
    return overridden


def _meant_override(parts: list[str]) -> str | None:
    """The override a variable probably meant: one `_` where `__` nests (UMCEF_SERVER_PORT) or a misspelt
    top-level key (UMCEF_LIMIT__MAX_BATCH); None for a variable that is no near miss."""
    head, rest = parts[0], parts[1:]
    for top in TOP_LEVEL_KEYS:
        if head.startswith(top + "_"):
            head, rest = top, [head[len(top) + 1:], *rest]
            break
    else:
        close = difflib.get_close_matches(head, TOP_LEVEL_KEYS, n=1, cutoff=0.8)
        if not close:
            return None
        head = close[0]
    return ENV_PREFIX + "__".join(p.upper() for p in (head, *rest))


class _Parser:
    """Walks the raw mapping; every mistake names the file, key path and what was expected."""

    def __init__(self, source: str, overridden: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.overridden = overridden or {}  # key path -> where its value came from instead of the file

    def fail(self, path: str, reason: str) -> ConfigError:
        origin = next((label for key, label in self.overridden.items()
                       if path == key or path.startswith((key + ".", key + "["))), self.source)
        return ConfigError(origin, path, reason)

    def section(self, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], path: str = "") -> dict[str, Any]:
        where = f"{path}.{key}" if path else key
        value = raw.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{where}.{name}", f"unknown key; expected one of {', '.join(allowed)}")
        return value

    def integer(self, raw: Mapping[str, Any], key: str, path: str, default: int | None,
                low: int = 0, high: int | None = None, nullable: bool = False) -> Any:
        value = raw.get(key, default)
        if value is None and (nullable or default is None):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{path}.{key}", f"expected an integer, got {_kind(value)} {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(f"{path}.{key}", f"expected an integer {bound}, got {value}")
        return value

    def number(self, raw: Mapping[str, Any], key: str, path: str, default: float | None) -> float | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(f"{path}.{key}", f"expected a positive number of seconds, got {value!r}")
        return float(value)

    def string(self, raw: Mapping[str, Any], key: str, path: str, default: str,
               choices: tuple[str, ...] = ()) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{path}.{key}", f"expected a non-empty string, got {_kind(value)}")
        if choices and value not in choices:
            raise self.fail(f"{path}.{key}", f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def config(self, raw: dict[str, Any]) -> Config:
        for key in raw:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(str(key), f"unknown key; expected one of {', '.join(TOP_LEVEL_KEYS)}")
        data_dir = Path(self.string(raw, "data_dir", "", "umcef-data").strip())
        s = self.section(raw, "server", ("host", "port", "grpc_port"))
        server = ServerConfig(
            host=self.string(s, "host", "server", "127.0.0.1"),
            port=self.integer(s, "port", "server", 8080, 0, 65535),
            grpc_port=self.integer(s, "grpc_port", "server", 8081, 0, 65535, nullable=True),
        )
        lim = self.section(raw, "limits", ("max_body_bytes", "max_batch", "max_attributes", "max_attribute_bytes"))
        limits = Limits(
            max_body_bytes=self.integer(lim, "max_body_bytes", "limits", DEFAULT_LIMITS.max_body_bytes, 1),
            max_batch=self.integer(lim, "max_batch", "limits", DEFAULT_LIMITS.max_batch, 1),
            max_attributes=self.integer(lim, "max_attributes", "limits", DEFAULT_LIMITS.max_attributes, 4),
            max_attribute_bytes=self.integer(
                lim, "max_attribute_bytes", "limits", DEFAULT_LIMITS.max_attribute_bytes, 1),
        )
        store = self.store(raw)
        dedup = self.dedup(raw)
        delivery = self.delivery_defaults(raw)
        destinations = self.destinations(raw.get("destinations") or {})
        default = self.string(raw, "default", "", "local://" + DEFAULT_TOPIC)
        default_name = self.default_destination(default, destinations)
        destinations = self.delivery_limits(raw.get("destinations") or {}, destinations, delivery.defaults, store)
        backpressure = self.backpressure(raw, destinations)
        routing = self.routing(_without_delivery_keys(raw), destinations, default_name)
        sources = self.sources(raw.get("sources") or [])
        return Config(self.source, data_dir, server, limits, store, dedup, backpressure, destinations,
                      routing.routes, default_name, sources, routing, delivery)

    def store(self, raw: Mapping[str, Any]) -> StoreConfig:
        st = self.section(raw, "store", ("sync", "max_age_seconds", "max_events_per_topic", "fsync_interval_ms"))
        sync = self.string(st, "sync", "store", "full", SYNC_POLICIES)
        interval = st.get("fsync_interval_ms", StoreConfig().fsync_interval_ms)
        if "fsync_interval_ms" in st and sync != "interval":
            raise self.fail("store.fsync_interval_ms", f"only used with sync: interval, got sync: {sync}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not (
                0 < interval <= MAX_FSYNC_INTERVAL_MS):
            raise self.fail("store.fsync_interval_ms", f"expected a number of milliseconds above 0 and at most "
                                                       f"{MAX_FSYNC_INTERVAL_MS}, got {interval!r}")
        return StoreConfig(
            sync=sync,
            max_age_seconds=self.number(st, "max_age_seconds", "store", 7 * 24 * 3600.0),
            max_events_per_topic=self.integer(st, "max_events_per_topic", "store", None, 1, nullable=True),
            fsync_interval_ms=float(interval),
        )

    def backpressure(self, raw: Mapping[str, Any], destinations: dict[str, DestinationConfig]) -> BackpressureConfig:
        bp = self.section(raw, "backpressure", ("max_spooled_events", "max_spooled_bytes", "retry_after_seconds",
                                                "shed_low_at", "shed_normal_at", "max_in_flight_bytes"))
        path = "backpressure"
        # (the default never sits below a shed_low_at set alone, which was valid before it was 0.9)
        low = bp.get("shed_low_at")
        default_normal = SHED_NORMAL_AT
        if isinstance(low, float | int) and not isinstance(low, bool) and low <= 1:
            default_normal = max(SHED_NORMAL_AT, float(low))
        shed_normal = self.fraction(bp, "shed_normal_at", path, default_normal, 1.0, "1")
        shed_low = self.fraction(bp, "shed_low_at", path, 0.5, shed_normal, f"shed_normal_at ({shed_normal:g})")
        limits: dict[str, SpoolLimit] = {}
        specs = raw.get("destinations")
        for name, spec in (specs.items() if isinstance(specs, dict) else ()):
            if not isinstance(spec, dict) or not any(key in spec for key in SPOOL_LIMIT_KEYS):
                continue
            where = f"destinations.{name}"
            if destinations[str(name)].is_local:
                key = next(key for key in SPOOL_LIMIT_KEYS if key in spec)
                raise self.fail(f"{where}.{key}", "only for remote destinations: a local:// destination has no "
                                                  "delivery spool (the durable write is the delivery)")
            limits[str(name)] = SpoolLimit(self.integer(spec, "max_spooled_events", where, None, 1, nullable=True),
                                           self.integer(spec, "max_spooled_bytes", where, None, 1, nullable=True))
        routes = raw.get("routes")
        classes: dict[str, str] = {}
        for i, route in enumerate(routes if isinstance(routes, list) else ()):
            if isinstance(route, dict) and "priority_class" in route:
                cls = self.string(route, "priority_class", f"routes[{i}]", "normal", PRIORITY_CLASSES)
                classes[str(route.get("name", f"route{i}"))] = cls
        return BackpressureConfig(
            max_spooled_events=self.integer(bp, "max_spooled_events", path, MAX_SPOOLED_EVENTS, 1, nullable=True),
            max_spooled_bytes=self.integer(bp, "max_spooled_bytes", path, None, 1, nullable=True),
            retry_after_seconds=self.number(bp, "retry_after_seconds", path, 1.0) or 1.0,
            shed_low_at=shed_low,
            shed_normal_at=shed_normal,
            max_in_flight_bytes=self.integer(bp, "max_in_flight_bytes", path, MAX_IN_FLIGHT_BYTES,
                                             1, nullable=True),
            destinations=limits,
            route_classes=classes,
        )

    def fraction(self, raw: Mapping[str, Any], key: str, path: str, default: float, high: float,
                 bound: str) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
            raise self.fail(f"{path}.{key}", f"expected a fraction above 0 and at most {bound}, got {value!r}")
        return float(value)

    def delivery_defaults(self, raw: Mapping[str, Any]) -> DeliveryConfig:
        d = self.section(raw, "delivery", (*DELIVERY_KEYS, "drain_seconds", "process"))
        drain = d.get("drain_seconds", 5.0)
        if isinstance(drain, bool) or not isinstance(drain, int | float) or drain < 0:
            raise self.fail("delivery.drain_seconds", f"expected a number of seconds >= 0, got {drain!r}")
        process = d.get("process", False)
        if not isinstance(process, bool):
            raise self.fail("delivery.process", f"expected true or false, got {process!r}")
        return DeliveryConfig(self.limits(d, "delivery", DeliveryLimits()), float(drain), process)

    def limits(self, d: Mapping[str, Any], path: str, base: DeliveryLimits) -> DeliveryLimits:
        dead_letter = self.string(d, "dead_letter", path, base.dead_letter)
        limits = DeliveryLimits(
            max_attempts=self.integer(d, "max_attempts", path, base.max_attempts, 1, nullable=True)
            if "max_attempts" in d else base.max_attempts,
            max_age_seconds=self.number(d, "max_age_seconds", path, base.max_age_seconds)
            if "max_age_seconds" in d else base.max_age_seconds,
            backoff_base_seconds=self.number(d, "backoff_base_seconds", path, base.backoff_base_seconds)
            or base.backoff_base_seconds,
            backoff_cap_seconds=self.number(d, "backoff_cap_seconds", path, base.backoff_cap_seconds)
            or base.backoff_cap_seconds,
            dead_letter=dead_letter.strip(),
            pages_in_flight=self.integer(d, "pages_in_flight", path, base.pages_in_flight, 1, 64),
            memory_events=self.integer(d, "memory_events", path, base.memory_events, 0),
            pace_above_events=self.integer(d, "pace_above_events", path, base.pace_above_events, 1, nullable=True),
        )
        if limits.backoff_cap_seconds < limits.backoff_base_seconds:
            raise self.fail(f"{path}.backoff_cap_seconds",
                            f"expected at least backoff_base_seconds ({limits.backoff_base_seconds:g}), "
                            f"got {limits.backoff_cap_seconds:g}")
        return limits

    def delivery_limits(self, raw: Any, destinations: dict[str, DestinationConfig], defaults: DeliveryLimits,
                        store: StoreConfig) -> dict[str, DestinationConfig]:
        """Each destination's retry limits: the `delivery:` defaults with its own `delivery:` keys on top."""
        out: dict[str, DestinationConfig] = {}
        specs = raw if isinstance(raw, dict) else {}
        for name, dest in destinations.items():
            spec = specs.get(name)
            path = f"destinations.{name}.delivery"
            own = self.section(spec, "delivery", DELIVERY_KEYS, f"destinations.{name}") \
                if isinstance(spec, dict) else {}
            limits = self.limits(own, path, defaults) if own else defaults
            where = path if "dead_letter" in own else "delivery"
            target = limits.dead_letter
            if target != DEAD_LETTER:
                if target not in destinations:
                    raise self.fail(f"{where}.dead_letter", f"expected {DEAD_LETTER} or a configured destination "
                                                            f"name, got {target!r}")
                if target == name and not dest.is_local:
                    raise self.fail(f"{where}.dead_letter",
                                    f"destination {name!r} cannot be its own dead-letter destination")
            if not dest.is_local and store.max_age_seconds is not None and (
                    limits.max_age_seconds is None or limits.max_age_seconds > store.max_age_seconds):
                where = path if "max_age_seconds" in own else "delivery"
                raise self.fail(f"{where}.max_age_seconds",
                                f"expected at most store.max_age_seconds ({store.max_age_seconds:g}): no event "
                                f"waits longer than the store keeps records, got {limits.max_age_seconds}")
            out[name] = DestinationConfig(dest.name, dest.url, dest.scheme, dest.topic, dest.options, limits)
        self.dead_letter_loops(out, specs)
        return out

    def dead_letter_loops(self, destinations: dict[str, DestinationConfig], specs: Mapping[str, Any]) -> None:
        """A dead letter of X goes to Y's spool; if Y's own dead letters lead back to X, an event every one of
        them refuses would circle forever, each copy a new event with a new age."""
        for start in destinations:
            chain = [start]
            while True:
                dest = destinations[chain[-1]]
                target = dest.delivery.dead_letter
                if dest.is_local or target == DEAD_LETTER or destinations[target].is_local:
                    break
                if target in chain:
                    own = isinstance(specs.get(start), dict) and "dead_letter" in (specs[start].get("delivery") or {})
                    where = f"destinations.{start}.delivery" if own else "delivery"
                    loop = " -> ".join([*chain[chain.index(target):], target])
                    raise self.fail(f"{where}.dead_letter", f"dead letters would go round in a loop: {loop}")
                chain.append(target)

    def dedup(self, raw: Mapping[str, Any]) -> DedupConfig:
        d = self.section(raw, "dedup", ("store", "url", "window_seconds", "max_entries"))
        store = self.string(d, "store", "dedup", "memory", ("memory", "redis"))
        url = d.get("url")
        if store == "redis":
            if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
                raise self.fail("dedup.url", f"expected a redis://HOST:PORT/DB URL for the redis store, got {url!r}")
        elif url is not None:
            raise self.fail("dedup.url", "only used with store: redis")
        return DedupConfig(
            store=store,
            url=url,
            window_seconds=self.number(d, "window_seconds", "dedup", 600.0) or 600.0,
            max_entries=self.integer(d, "max_entries", "dedup", 1_000_000, 1),
        )

    def destinations(self, raw: Any) -> dict[str, DestinationConfig]:
        if not isinstance(raw, dict):
            raise self.fail("destinations", f"expected a mapping of name to destination, got {_kind(raw)}")
        out = {}
        for name, spec in raw.items():
            path = f"destinations.{name}"
            url = spec if isinstance(spec, str) else spec.get("url") if isinstance(spec, dict) else None
            if not isinstance(url, str):
                raise self.fail(path, "expected a URL string or a mapping with a 'url' key")
            options = self.options(spec.get("options") if isinstance(spec, dict) else None, f"{path}.options")
            out[str(name)] = self.destination(str(name), url, path + (".url" if isinstance(spec, dict) else ""),
                                              options, adapter_path=path)
        return out

    def adapter(self, url: str, options: dict[str, Any], path: str) -> None:
        """What the adapter itself would refuse when the gateway opens it (a malformed broker URL, an option's
        value), refused now with the key path, not as a traceback at start-up."""
        from umcef.adapters import check_url

        try:
            check_url(url, **options)
        except (ValueError, TypeError) as exc:
            raise self.fail(path, str(exc)) from None

    def options(self, raw: Any, path: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(path, f"expected a mapping of adapter options, got {_kind(raw)}")
        return {str(k): v for k, v in raw.items()}

    def url(self, url: str, path: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in KNOWN_SCHEMES:
            raise self.fail(path, f"unknown scheme in {url!r}; expected one of "
                                  + ", ".join(s + "://" for s in KNOWN_SCHEMES))
        return scheme

    def destination(self, name: str, url: str, path: str, options: dict[str, Any] | None = None, *,
                    adapter_path: str | None = None) -> DestinationConfig:
        """`adapter_path`: the key path an adapter's refusal names (the destination's, not its `url` key's)."""
        scheme = self.url(url, path)
        if scheme != "local":
            from umcef.fabric.delivery import spool_topic

            self.adapter(url, options or {}, adapter_path or path)
            return DestinationConfig(name, url, scheme, spool_topic(name), options or {})
        parts = urlsplit(url)
        topic = (parts.netloc + parts.path).strip("/")
        if not topic or "/" in topic or topic.startswith("_"):
            raise self.fail(path, f"expected local://TOPIC with a single topic name not starting with '_', "
                                  f"got {url!r}")
        return DestinationConfig(name, url, scheme, topic, options or {})

    def sources(self, raw: Any) -> tuple[SourceConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail("sources", f"expected a list of sources, got {_kind(raw)}")
        out = []
        for i, item in enumerate(raw):
            path = f"sources[{i}]"
            if isinstance(item, str):
                item = {"url": item}
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise self.fail(path, "expected a URL string or a mapping with a 'url' key")
            for key in item:
                if key not in ("name", "url", "options", "max_in_flight"):
                    raise self.fail(f"{path}.{key}", "unknown key; expected one of name, url, options, max_in_flight")
            self.url(item["url"], f"{path}.url")
            options = self.options(item.get("options"), f"{path}.options")
            self.adapter(item["url"], options, path)
            out.append(SourceConfig(str(item.get("name", f"source{i}")), item["url"], options,
                                    self.integer(item, "max_in_flight", path, 64, 1)))
        return tuple(out)

    def default_destination(self, default: str, destinations: dict[str, DestinationConfig]) -> str:
        if default in destinations:
            return default
        for name, dest in destinations.items():
            if dest.url == default:
                return name
        dest = self.destination("default", default, "default")
        destinations.setdefault("default", dest)
        return "default"

    def routing(self, raw: Mapping[str, Any], destinations: dict[str, DestinationConfig],
                default: str) -> RoutingConfig:
        """Routes, residency and the destinations' routing attributes: router/config.py (docs/router.md)."""
        from umcef.router.config import RouterConfigError, parse

        try:
            return parse(raw, {name: d.url for name, d in destinations.items()}, default)
        except RouterConfigError as exc:
            raise self.fail(exc.path, exc.reason) from None


def _without_delivery_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping the router parses: destinations without their `delivery:` and spool watermark keys and
    routes without `priority_class` (ours, not the router's)."""
    out = dict(raw)
    specs = raw.get("destinations")
    if isinstance(specs, dict):
        ours = ("delivery", *SPOOL_LIMIT_KEYS)
        out["destinations"] = {name: {k: v for k, v in spec.items() if k not in ours}
                               if isinstance(spec, dict) else spec for name, spec in specs.items()}
    routes = raw.get("routes")
    if isinstance(routes, list):
        out["routes"] = [{k: v for k, v in route.items() if k != "priority_class"} if isinstance(route, dict)
                         else route for route in routes]
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
