"""Configuration: YAML + environment overrides; every mistake names file, key path and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from umcef.fabric.config import ConfigError, load

GOOD = """
data_dir: /tmp/x
server: {host: 0.0.0.0, port: 9000, grpc_port: 9001}
limits: {max_batch: 50}
destinations:
  orders: {url: "local://orders"}
  audit: "local://audit"
routes:
  - name: orders
    filter: {prefix: {type: "com.example.order."}}
    to: [orders, audit]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "umcef.yaml"
    path.write_text(text)
    return path


def test_good_file_and_env_overrides(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD), env={"UMCEF_SERVER__PORT": "9100", "UMCEF_LIMITS__MAX_BATCH": "7"})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 9100 and cfg.server.grpc_port == 9001
    assert cfg.limits.max_batch == 7
    assert cfg.destinations["audit"].topic == "audit"
    assert cfg.routes[0].to == ("orders", "audit")
    assert cfg.default_destination == "default" and cfg.destinations["default"].topic == "default"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("server: {port: abc}", {}, "umcef.yaml: server.port: expected an integer, got a string 'abc'"),
        ("server: {port: 70000}", {}, "server.port: expected an integer between 0 and 65535, got 70000"),
        ("server: {prot: 1}", {}, "server.prot: unknown key; expected one of host, port, grpc_port"),
        ("routez: []", {}, "routez: unknown key"),
        ("store: {sync: sometimes}", {}, "store.sync: expected one of full, normal, interval, got 'sometimes'"),
        ("destinations: {a: {url: 'local://_spool.x'}}", {}, "not starting with '_'"),
        ("sources: [{url: 'nats://x'}]", {}, "sources[0].url: unknown scheme in 'nats://x'"),
        ("sources: [{url: 'local://t', group: g}]", {}, "sources[0].group: unknown key"),
        ("destinations: {a: 'ftp://x'}", {}, "destinations.a: unknown scheme in 'ftp://x'"),
        ("destinations: {a: {url: 'local://'}}", {}, "destinations.a.url: expected local://TOPIC"),
        ("routes: [{name: r, to: [nope]}]", {}, "routes[0].to[0]: unknown destination 'nope'"),
        ("routes: [{name: r, filter: {regex: {type: x}}, to: [default]}]", {}, "routes[0].filter: unknown filter"),
        ("routes: [{name: r, filter: {all: [{exact: {}}]}, to: [default]}]", {}, "routes[0].filter.all[0].exact"),
        ("a: [", {}, "umcef.yaml: line 1, column 5: not valid YAML"),
        ("- 1", {}, "expected a mapping at the top level, got a list"),
        ("{}", {"UMCEF_SERVER__PORT": "x"}, "server.port: expected an integer"),
        # What the adapters refuse when they open, refused when the file is read (before: `config check` said ok
        # and `serve` died with a traceback at start).
        ("destinations: {a: {url: 'kafka://127.0.0.1:1/t', options: {acks: maybe}}}", {},
         "destinations.a: acks must be 0, 1, -1 or 'all', got 'maybe'"),
        ("destinations: {a: 'kafka://localhost:abc/t'}", {},
         "destinations.a: invalid port in Kafka bootstrap address 'localhost:abc'"),
        ("destinations: {a: 'kafka://127.0.0.1:1'}", {}, "destinations.a: expected kafka://HOST:PORT/TOPIC"),
        ("destinations: {a: 'kafka://h:1/t?bogus=1'}", {}, "destinations.a: unknown kafka:// URL parameters ['bogus']"),
        ("destinations: {a: {url: 'kafka://h:1/t', options: {nope: 1}}}", {},
         "destinations.a: unknown Kafka adapter options ['nope']"),
        ("destinations: {a: 'pubsub://'}", {}, "destinations.a: expected pubsub://PROJECT/TOPIC"),
        ("destinations: {a: {url: 'sqs://q', options: {wait_seconds: x}}}", {},
         "destinations.a: wait_seconds must be an integer, got 'x'"),
        ("destinations: {a: 'servicebus://ns/q?max_batch=z'}", {}, "destinations.a: max_batch must be an integer"),
        ("destinations: {a: 'servicebus://ns'}", {}, "destinations.a: expected servicebus://NAMESPACE/QUEUE_OR_TOPIC"),
        ("default: 'kafka://h:1'", {}, "default: expected kafka://HOST:PORT/TOPIC"),
        ("sources: [{url: 'kafka://h:1/t', options: {acks: 7}}]", {}, "sources[0]: acks must be 0, 1, -1 or 'all'"),
    ],
)
def test_mistakes_are_reported_exactly(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env=env)
    assert message in str(info.value)


def test_a_mistake_in_an_override_names_the_variable_or_the_flag_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 8080}")
    with pytest.raises(ConfigError) as info:
        load(path, env={"UMCEF_SERVER__PORT": "abc"})
    assert str(info.value) == "environment UMCEF_SERVER__PORT: server.port: expected an integer, got a string 'abc'"
    with pytest.raises(ConfigError) as info:  # `umcef serve --port 99999` hands its flags in as overrides
        load(path, env={"UMCEF_SERVER__PORT": "99999"}, labels={"UMCEF_SERVER__PORT": "--port"})
    assert str(info.value).startswith("--port: server.port: expected an integer between 0 and 65535")
    with pytest.raises(ConfigError) as info:  # the file's own mistake is still the file's
        load(write(tmp_path, "server: {port: abc}"), env={"UMCEF_SERVER__HOST": "0.0.0.0"})
    assert str(info.value).startswith(f"{tmp_path / 'umcef.yaml'}: server.port: expected an integer")


def test_other_umcef_variables_are_not_overrides(tmp_path: Path) -> None:
    """The Service Bus adapter's credentials, the native switch and the test harness's settings share the
    prefix; a gateway started beside them must not refuse them as unknown keys."""
    env = {"UMCEF_SERVICEBUS_CONNECTION_STRING": "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=s=",
           "UMCEF_SERVICEBUS_CONNECTION_STRING__MY_NS": "Endpoint=sb://y/", "UMCEF_PURE": "1",
           "UMCEF_TEST_WORKERS": "2", "UMCEF_SERVER__PORT": "9100", "UMCEF_DATA_DIR": str(tmp_path / "d")}
    cfg = load(write(tmp_path, GOOD), env=env)
    assert cfg.server.port == 9100 and cfg.data_dir == tmp_path / "d"
    with pytest.raises(ConfigError, match=r"server\.prot: unknown key"):  # a known section still checks its keys
        load(write(tmp_path, GOOD), env={"UMCEF_SERVER__PROT": "1"})


@pytest.mark.parametrize(("variable", "meant"), [
    ("UMCEF_SERVER_PORT", "UMCEF_SERVER__PORT"),
    ("UMCEF_LIMIT__MAX_BATCH", "UMCEF_LIMITS__MAX_BATCH"),
    ("UMCEF_DATADIR", "UMCEF_DATA_DIR"),
    ("UMCEF_STORE_SYNC", "UMCEF_STORE__SYNC"),
])
def test_a_near_miss_of_an_override_is_reported_with_what_it_meant(tmp_path: Path, variable: str,
                                                                    meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, GOOD), env={variable: "1"})
    assert str(info.value) == f"environment {variable}: not a configuration key; did you mean {meant}?"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path / "absent.yaml", env={})
