"""The CloudEvents SQL TCK, every case of every file, run against umcef.router.cesql.

The kit lives in the shared spec checkout next to this repository. Each case becomes one test; none is
skipped or special-cased: the expected value (type and value) and the expected error type are both
checked, and a case that expects no error must produce none.

Events: a case's `event` is taken as a structured-mode JSON CloudEvent and decoded by the gateway's own
JSON format, so the expression sees exactly the attributes routing would see; `eventOverrides` are
applied to it (or to a default valid event when the case has none) before decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from umcef.fabric.formats import json_format
from umcef.router import cesql

TCK_DIR = Path(__file__).resolve().parents[2] / "shared/spec/cloudevents/cesql/cesql_tck"

# "If absent, when testing the expression, any valid event can be passed."
DEFAULT_EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "tck-default-id",
    "source": "https://umcef.example/tck",
    "type": "io.cloudevents.tck.default",
    "subject": "tck-subject",
    "time": "2018-04-26T14:48:09+02:00",
    "datacontenttype": "application/json",
}


class _TckLoader(yaml.SafeLoader):
    """YAML without the implicit timestamp type: an event's `time` is an RFC 3339 *string* in a JSON
    CloudEvent, and the expected result of `time` must be the same string, not a datetime."""


_TckLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_suite(text: str) -> Any:
    """Load one TCK file. An `expression` is CESQL source text whatever it looks like to YAML
    (`expression: TRUE` or `expression: -10` would otherwise become a bool or an int)."""
    loader = _TckLoader(text)
    try:
        root = loader.get_single_node()
        _expressions_as_text(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _expressions_as_text(node: yaml.Node) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "expression" and isinstance(value, yaml.ScalarNode):
                value.tag = "tag:yaml.org,2002:str"
            _expressions_as_text(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _expressions_as_text(item)


def _load_cases() -> list[Any]:
    if not TCK_DIR.is_dir():
        raise RuntimeError(
            f"CESQL TCK not found at {TCK_DIR}; it is part of the shared CloudEvents spec checkout "
            "(../shared/spec/cloudevents/cesql/cesql_tck relative to the repository)"
        )
    files = sorted(TCK_DIR.glob("*.yaml"))
    if not files:
        raise RuntimeError(f"no TCK files (*.yaml) in {TCK_DIR}")
    cases = []
    for path in files:
        suite = _load_suite(path.read_text(encoding="utf-8"))
        for index, case in enumerate(suite["tests"]):
            cases.append(pytest.param(case, id=f"{path.stem}[{index}] {case['name']}"))
    return cases


CASES = _load_cases()


def _event_attributes(case: dict[str, Any]) -> dict[str, Any]:
    event = dict(case["event"]) if "event" in case else dict(DEFAULT_EVENT)
    event.update(case.get("eventOverrides") or {})
    return json_format.decode(json.dumps(event)).attributes


def test_tck_is_complete() -> None:
    """Every YAML file contributed cases (a file that failed to load would silently shrink the kit)."""
    stems = {Path(p).stem for p in TCK_DIR.glob("*.yaml")}
    covered = {param.id.split("[", 1)[0] for param in CASES if param.id}
    assert covered == stems
    assert len(CASES) >= 200


# Every case twice: compiled with the fast paths and constant folding, and plain (one general closure
# per operator), so the specialised code is held to the kit as well as the general code.
@pytest.mark.parametrize("optimize", [True, False], ids=["optimized", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_tck(case: dict[str, Any], optimize: bool) -> None:
    expression = case["expression"]
    expected_error = case.get("error")
    if expected_error == "parse":
        with pytest.raises(cesql.CesqlParseError):
            cesql.compile_expression(expression)

    result = cesql.evaluate(expression, _event_attributes(case), optimize=optimize)

    kinds = [error.kind for error in result.errors]
    if expected_error is None:
        assert kinds == [], f"{expression!r}: unexpected errors {result.errors}"
    else:
        assert kinds, f"{expression!r}: expected a {expected_error} error, got none (value {result.value!r})"
        assert set(kinds) == {expected_error}, f"{expression!r}: expected {expected_error}, got {result.errors}"

    if "result" in case:
        expected = case["result"]
        assert type(result.value) is type(expected) and result.value == expected, (
            f"{expression!r}: expected {expected!r} ({type(expected).__name__}), "
            f"got {result.value!r} ({type(result.value).__name__})"
        )
