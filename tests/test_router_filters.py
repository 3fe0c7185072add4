"""Subscriptions API filter dialects, the flat node program, the `type` guard and the disjointness prover."""

from __future__ import annotations

from typing import Any

import pytest

from umcef.router.filters import (
    OP_ALL,
    OP_EXACT,
    OP_SQL,
    FilterError,
    FilterProgram,
    compile_filter,
    jointly_satisfiable,
    predicate,
    regulation_views,
    terms,
    type_guard,
)

ORDER = {"specversion": "1.0", "id": "1", "source": "/shop", "type": "com.example.order.placed",
         "subject": "orders/42", "count": 5, "flag": True, "dataregulation": "GDPR"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"exact": {"type": "com.example.order.placed"}}, True),
        ({"exact": {"type": "com.example.order"}}, False),
        ({"exact": {"type": "com.example.order.placed", "subject": "orders/42"}}, True),
        ({"exact": {"type": "com.example.order.placed", "subject": "orders/43"}}, False),
        ({"exact": {"count": 5}}, True),  # canonical string form of an Integer
        ({"exact": {"count": "5"}}, True),
        ({"exact": {"flag": True}}, True),
        ({"exact": {"flag": "true"}}, True),
        ({"exact": {"missing": "x"}}, False),
        ({"prefix": {"type": "com.example."}}, True),
        ({"prefix": {"type": "com.other."}}, False),
        ({"prefix": {"missing": ""}}, False),  # a missing attribute never matches
        ({"suffix": {"type": ".placed"}}, True),
        ({"suffix": {"subject": "/41"}}, False),
        ({"all": [{"prefix": {"type": "com."}}, {"suffix": {"type": "placed"}}]}, True),
        ({"all": [{"prefix": {"type": "com."}}, {"suffix": {"type": "shipped"}}]}, False),
        ({"any": [{"prefix": {"type": "org."}}, {"suffix": {"type": "placed"}}]}, True),
        ({"any": [{"prefix": {"type": "org."}}, {"suffix": {"type": "shipped"}}, {"exact": {"id": "2"}}]}, False),
        ({"not": {"exact": {"type": "com.example.order.placed"}}}, False),
        ({"not": {"exact": {"missing": "x"}}}, True),
        ({"sql": "type LIKE 'com.example.%' AND count > 3"}, True),
        ({"sql": "count > 5"}, False),
        ({"sql": "missing = 'x'"}, False),  # an evaluation error is no match
        ({"sql": "EXISTS dataregulation AND flag"}, True),
    ],
)
def test_dialects(spec: Any, expected: bool) -> None:
    assert compile_filter(spec)(ORDER) is expected


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        ({"regex": {"type": "x"}}, "filter", "unknown filter dialect 'regex'"),
        ({"exact": {"type": "x"}, "prefix": {"type": "y"}}, "filter", "exactly one dialect key"),
        ({"exact": {}}, "filter.exact", "non-empty mapping"),
        ({"exact": {"n": 1.5}}, "filter.exact.n", "expected a string value"),
        ({"all": []}, "filter.all", "non-empty list"),
        ({"any": [{"exact": {"a": "b"}}, {"nope": {}}]}, "filter.any[1]", "unknown filter dialect"),
        ({"not": {"sql": ""}}, "filter.not.sql", "expected a CESQL expression"),
        ({"sql": "type = = 'x'"}, "filter.sql", "CESQL syntax error at position 7 (line 1, column 8)"),
        ({"sql": "NOSUCHFN(type)"}, "filter.sql", "CESQL error"),
    ],
)
def test_errors_name_the_path(spec: Any, path: str, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(spec)
    assert info.value.path == path
    assert fragment in info.value.reason


def test_flat_program_layout() -> None:
    program = FilterProgram()
    root = program.add({"all": [{"exact": {"type": "t", "subject": "s"}}, {"sql": "x = 1"}]})
    nodes = program.freeze()
    assert nodes.op[root] == OP_ALL and nodes.b[root] == 2
    first, second = nodes.kids[nodes.a[root]:nodes.a[root] + 2]
    assert nodes.op[first] == OP_ALL and nodes.op[second] == OP_SQL
    leaf = nodes.kids[nodes.a[first]]
    assert nodes.op[leaf] == OP_EXACT and nodes.strings[nodes.a[leaf]] == "type" and nodes.strings[nodes.b[leaf]] == "t"
    assert predicate(nodes, root)({"type": "t", "subject": "s", "x": 1})
    # strings are interned across filters
    again = program.add({"exact": {"type": "t"}})
    assert program.freeze().strings.count("t") == 1 and again > root


@pytest.mark.parametrize(
    ("spec", "guard"),
    [
        ({"exact": {"type": "a.b"}}, ("exact", "a.b")),
        ({"prefix": {"type": "a."}}, ("prefix", "a.")),
        ({"prefix": {"type": ""}}, None),
        ({"suffix": {"type": ".b"}}, None),
        ({"exact": {"subject": "x"}}, None),
        ({"all": [{"prefix": {"type": "a."}}, {"exact": {"subject": "s"}}, {"prefix": {"type": "a.bc"}}]},
         ("prefix", "a.bc")),
        ({"all": [{"prefix": {"type": "a."}}, {"exact": {"type": "a.x"}}]}, ("exact", "a.x")),
        ({"any": [{"exact": {"type": "a"}}, {"exact": {"type": "b"}}]}, None),
        ({"sql": "type LIKE 'com.x.%' AND subject = 's'"}, ("prefix", "com.x.")),
        ({"sql": "'t.1' = type"}, ("exact", "t.1")),
        ({"sql": "type LIKE 'com._.%'"}, None),
        ({"sql": "type LIKE 'a' OR type LIKE 'b'"}, None),
        ({"sql": "type NOT LIKE 'a%'"}, None),
    ],
)
def test_type_guard(spec: Any, guard: tuple[str, str] | None) -> None:
    program = FilterProgram()
    root = program.add(spec)
    assert type_guard(program.freeze(), root) == guard


def overlap(route: Any, *policies: Any) -> bool:
    program = FilterProgram()
    r = program.add(route)
    ps = [program.add(p) for p in policies]
    nodes = program.freeze()
    route_terms = terms(nodes, r)
    policy_terms = [terms(nodes, p) for p in ps]

    def search(i: int, chosen: list[Any], rt: Any) -> bool:
        if i == len(policy_terms):
            return jointly_satisfiable(rt, chosen)
        return any(search(i + 1, [*chosen, pt], rt) for pt in policy_terms[i])

    return any(search(0, [], rt) for rt in route_terms)


GDPR = {"exact": {"dataregulation": "GDPR"}}


@pytest.mark.parametrize(
    ("route", "policies", "can_overlap"),
    [
        ({"exact": {"dataregulation": "HIPAA"}}, [GDPR], False),
        ({"exact": {"dataregulation": "GDPR"}}, [GDPR], True),
        ({"prefix": {"type": "x."}}, [GDPR], True),
        # "GDPR,HIPAA" is not exactly "GDPR", and residency sees its GDPR entry: not disjoint
        ({"not": GDPR}, [GDPR], True),
        # excluding every value that mentions GDPR is disjoint
        ({"not": {"sql": "dataregulation LIKE '%GDPR%'"}}, [GDPR], False),
        ({"all": [{"prefix": {"type": "x."}}, {"not": {"sql": "dataregulation LIKE '%GDPR%'"}}]}, [GDPR], False),
        ({"sql": "dataregulation NOT LIKE '%GDPR%'"}, [GDPR], False),
        ({"sql": "NOT (dataregulation LIKE '%GDPR%')"}, [GDPR], False),
        ({"not": {"exact": {"dataclassification": "public"}}}, [{"exact": {"dataclassification": "public"}}],
         False),
        # CESQL folds errors into "no match": `not` over sql says little about missing attributes
        ({"not": {"sql": "dataclassification != 'public'"}}, [{"not": {"exact": {"dataclassification": "public"}}}],
         True),
        ({"not": {"sql": "dataclassification = 'public' OR type = 'x'"}}, [{"exact": {"type": "x"}}], True),
        ({"not": {"sql": "dataclassification = 'public' OR type = 'x'"}},
         [{"exact": {"dataclassification": "public"}}], False),
        ({"not": {"sql": "dataclassification NOT LIKE 'p%'"}}, [{"exact": {"dataclassification": "q"}}], True),
        ({"any": [{"exact": {"dataregulation": "HIPAA"}}, {"exact": {"dataregulation": "PCI"}}]}, [GDPR], False),
        ({"any": [{"exact": {"dataregulation": "HIPAA"}}, {"prefix": {"type": "x."}}]}, [GDPR], True),
        ({"sql": "dataregulation = 'HIPAA'"}, [GDPR], False),
        ({"sql": "dataregulation IN ('HIPAA', 'PCI')"}, [GDPR], False),
        ({"sql": "dataregulation IN ('HIPAA', 'GDPR')"}, [GDPR], True),
        ({"sql": "NOT (dataregulation = 'GDPR')"}, [GDPR], True),  # "GDPR,HIPAA" again
        ({"sql": "dataclassification <> 'secret' AND type LIKE 'x.%'"}, [{"exact": {"dataclassification": "secret"}}],
         False),
        ({"sql": "dataregulation LIKE 'HIP%'"}, [GDPR], True),  # a list "HIPAA,GDPR" matches both
        ({"prefix": {"dataregulation": "HIPAA"}}, [GDPR], True),  # same: only equality pins the entries
        ({"exact": {"dataregulation": "HIPAA,GDPR"}}, [GDPR], True),
        ({"exact": {"dataclassification": "public"}}, [{"sql": "dataclassification = 'restricted'"}], False),
        ({"exact": {"count": "5"}}, [{"sql": "count = '05'"}], True),  # casts: '05' = 5 is true in CESQL
        ({"prefix": {"type": "a."}}, [{"prefix": {"type": "b."}}], False),
        ({"prefix": {"type": "a."}}, [{"prefix": {"type": "a.b"}}], True),
        ({"suffix": {"type": ".x"}}, [{"exact": {"type": "a.y"}}], False),
        ({"sql": "false"}, [GDPR], False),
        # two policies on different entries of one list can apply together
        ({"prefix": {"type": "x."}}, [GDPR, {"exact": {"dataregulation": "HIPAA"}}], True),
        ({"exact": {"dataregulation": "GDPR"}}, [GDPR, {"exact": {"dataregulation": "HIPAA"}}], False),
    ],
)
def test_disjointness_is_proved_only_when_certain(route: Any, policies: list[Any], can_overlap: bool) -> None:
    assert overlap(route, *policies) is can_overlap


def test_regulation_views() -> None:
    assert regulation_views({"dataregulation": "GDPR"}) is None
    assert regulation_views({}) is None
    views = regulation_views({"dataregulation": " GDPR , HIPAA", "type": "t"})
    assert views == [{"dataregulation": "GDPR", "type": "t"}, {"dataregulation": "HIPAA", "type": "t"}]
