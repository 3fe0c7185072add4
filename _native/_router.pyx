# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twin of the router's decision (`umcef.router.decide.Router._decide`, the pure reference).

`NativeTable(table)` copies a compiled `RouteTable` (router/table.py, docs/router.md) into C arrays once,
when the table is installed (off the hot path: `Router.swap` builds it before the one reference
assignment that activates the table). `NativeTable.decide(router, active, event, now, size)` is then the
whole decision in typed C loops:

- dispatch on `type`: uint64 bitmask rows (residual | type_exact[type] | type_prefix[type[:L]]),
  visited lowest bit first (priority order);
- the flat filter node program (TRUE/EXACT/PREFIX/SUFFIX/ALL/ANY/NOT/SQL) walked over the arrays;
- CESQL: the common node kinds are compiled to a native node program (`SqlProgram`, below);
- residency masks (per `dataregulation` entry), health / max-RTT constraints read straight from the
  estimator's `array` buffers, the four modes, latency + cost scoring with the event size computed
  natively, and hysteresis kept in the *same* per-router state dict as the reference (so explain
  records, table swaps and the pure path all see one state).

It shares the reference's cached `Decision` objects (`_Active.single`, `_Active.all_cache`), so the
results are not only equal but the same objects. Rare paths call the reference's own code: a route
with no healthy allowed destination (`Router._hold`: holds for an allowed one or, when residency allows
none, `Router._unroutable` writes the reason), an `all`-mode cache miss
(`Router._route`), an attributes object that is not a plain `dict`, and explain records (the router
hands `explain=True` to the pure path; explain is pure-only).

CESQL natively: Boolean/Integer/String literals (and `-<integer literal>`), attribute access, EXISTS,
NOT, AND, OR, =, !=/<>, <, <=, >, >=, [NOT] LIKE and [NOT] IN, for operands of the *same* CESQL type
(attributes that are exact `str`, `bool` or 32-bit `int`). An error the reference would record (a
missing attribute) makes the filter false at once, as it does there (filter semantics: true with no
error). Anything needing an implicit cast, an attribute of another Python type, or a value whose CESQL
representation is not immediate hands the *whole* expression to the compiled Python closure
(`Expression.matches`) for that event. Expressions containing arithmetic, XOR, function calls or other
negations are never compiled: they always run the Python closure.
"""

from cpython.array cimport array
from cpython.dict cimport PyDict_GetItem, PyDict_Next
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from umcef.fabric.bindings.http import attribute_to_string as _attribute_to_string
from umcef.router.cesql import (
    Binary as _Binary,
    BinaryOp as _BinaryOp,
    BooleanLiteral as _BooleanLiteral,
    Exists as _Exists,
    Identifier as _Identifier,
    In as _In,
    IntegerLiteral as _IntegerLiteral,
    Like as _Like,
    LikePlan as _LikePlan,
    REQUIRED_ATTRIBUTES as _REQUIRED,
    StringLiteral as _StringLiteral,
    Unary as _Unary,
    UnaryOp as _UnaryOp,
)
from umcef.router.cost import _json_size


cdef extern from "Python.h":
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    char* PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    object PyLong_FromUnsignedLongLong(unsigned long long v)


cdef extern from *:
    """
    static inline int umcef_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int umcef_ctz64(unsigned long long x) nogil


# --------------------------------------------------------------------------------------------------
# Constants shared with the reference (router/table.py, router/filters.py)

DEF OP_TRUE = 0
DEF OP_EXACT = 1
DEF OP_PREFIX = 2
DEF OP_SUFFIX = 3
DEF OP_ALL = 4
DEF OP_ANY = 5
DEF OP_NOT = 6
DEF OP_SQL = 7

DEF MODE_ALL = 0
DEF MODE_BEST = 1
DEF MODE_FAILOVER = 2
DEF MODE_SPLIT = 3

DEF INT32_MIN = -2147483648
DEF INT32_MAX = 2147483647

cdef str _LIST_ATTRIBUTE = "dataregulation"
cdef str _TYPE = "type"
cdef str _PARTITIONKEY = "partitionkey"
cdef str _ID = "id"

_Decision = None  # umcef.router.decide.Decision, imported on first use (decide imports this module)


# --------------------------------------------------------------------------------------------------
# CESQL: a native node program for the common node kinds

DEF S_CONST = 0
DEF S_ATTR = 1
DEF S_EXISTS = 2
DEF S_NOT = 3
DEF S_AND = 4
DEF S_OR = 5
DEF S_EQ = 6
DEF S_NE = 7
DEF S_LT = 8
DEF S_LE = 9
DEF S_GT = 10
DEF S_GE = 11
DEF S_LIKE = 12
DEF S_IN = 13

DEF K_BOOL = 0
DEF K_INT = 1
DEF K_STR = 2

DEF R_OK = 0
DEF R_ERROR = 1      # the reference records an error: the filter is false whatever follows
DEF R_FALLBACK = 2   # outside the native subset for this event: run the Python closure

DEF L_EXACT = 0
DEF L_PREFIX = 1
DEF L_SUFFIX = 2
DEF L_CONTAINS = 3
DEF L_ENDS = 4
DEF L_REGEX = 5

cdef struct Val:
    int kind
    int64_t i
    PyObject* s  # borrowed: from the attributes dict or the program's constants


class _Unsupported(Exception):
    pass


_COMPARE = {
    _BinaryOp.EQ: S_EQ, _BinaryOp.NE: S_NE, _BinaryOp.LT: S_LT, _BinaryOp.LE: S_LE,
    _BinaryOp.GT: S_GT, _BinaryOp.GE: S_GE, _BinaryOp.AND: S_AND, _BinaryOp.OR: S_OR,
}
_LIKE_KINDS = {"exact": L_EXACT, "prefix": L_PREFIX, "suffix": L_SUFFIX, "contains": L_CONTAINS,
               "ends": L_ENDS, "regex": L_REGEX}


cdef class SqlProgram:
    """One CESQL expression: a native node program when every node is in the native subset, else only
    the Python closure. `matches(attrs)` is `Expression.matches(attrs)`, exactly."""

    cdef int* op
    cdef int* a
    cdef int* b
    cdef int* c
    cdef int* kids
    cdef int n
    cdef int root
    cdef list _consts      # str / int / bool per constant index
    cdef tuple _const_tuple
    cdef int* ckind
    cdef int64_t* cint
    cdef list _plans       # (kind, head, tail, fullmatch) per LIKE node
    cdef object _matches   # Expression.matches
    cdef readonly bint native
    cdef readonly object expression

    def __cinit__(self):
        self.op = self.a = self.b = self.c = self.kids = self.ckind = NULL
        self.cint = NULL

    def __dealloc__(self):
        free(self.op); free(self.a); free(self.b); free(self.c); free(self.kids)
        free(self.ckind); free(self.cint)

    def __init__(self, expression):
        self.expression = expression
        self._matches = expression.matches
        self._consts = []
        self._plans = []
        rows = []   # (op, a, b, c)
        kids = []
        self._const_tuple = ()
        try:
            self.root = self._build(expression.ast, rows, kids)
        except _Unsupported:
            self.native = False
            return
        self._const_tuple = tuple(self._consts)
        self.native = True
        self.n = len(rows)
        self.op = <int*>malloc(sizeof(int) * (self.n + 1))
        self.a = <int*>malloc(sizeof(int) * (self.n + 1))
        self.b = <int*>malloc(sizeof(int) * (self.n + 1))
        self.c = <int*>malloc(sizeof(int) * (self.n + 1))
        self.kids = <int*>malloc(sizeof(int) * (len(kids) + 1))
        self.ckind = <int*>malloc(sizeof(int) * (len(self._consts) + 1))
        self.cint = <int64_t*>malloc(sizeof(int64_t) * (len(self._consts) + 1))
        if not (self.op and self.a and self.b and self.c and self.kids and self.ckind and self.cint):
            raise MemoryError()
        cdef int i
        for i, (o, x, y, z) in enumerate(rows):
            self.op[i] = o
            self.a[i] = x
            self.b[i] = y
            self.c[i] = z
        for i, k in enumerate(kids):
            self.kids[i] = k
        for i, v in enumerate(self._consts):
            if v is True or v is False:
                self.ckind[i] = K_BOOL
                self.cint[i] = 1 if v else 0
            elif type(v) is int:
                self.ckind[i] = K_INT
                self.cint[i] = v
            else:
                self.ckind[i] = K_STR
                self.cint[i] = 0

    def _const(self, value, rows):
        if type(value) is int and not INT32_MIN <= value <= INT32_MAX:
            raise _Unsupported()
        self._consts.append(value)
        rows.append((S_CONST, len(self._consts) - 1, 0, 0))
        return len(rows) - 1

    def _build(self, node, rows, kids):
        if isinstance(node, (_BooleanLiteral, _IntegerLiteral, _StringLiteral)):
            return self._const(node.value, rows)
        if isinstance(node, _Identifier):
            self._consts.append(node.name)
            rows.append((S_ATTR, len(self._consts) - 1, 0, 0))
            return len(rows) - 1
        if isinstance(node, _Exists):
            if node.name in _REQUIRED:  # the reference folds these to true, present or not
                return self._const(True, rows)
            self._consts.append(node.name)
            rows.append((S_EXISTS, len(self._consts) - 1, 0, 0))
            return len(rows) - 1
        if isinstance(node, _Unary):
            if node.op is _UnaryOp.NOT:
                child = self._build(node.operand, rows, kids)
                rows.append((S_NOT, child, 0, 0))
                return len(rows) - 1
            if isinstance(node.operand, _IntegerLiteral) and node.operand.value != INT32_MIN:
                return self._const(-node.operand.value, rows)  # folded by the reference too
            raise _Unsupported()
        if isinstance(node, _Binary):
            code = _COMPARE.get(node.op)
            if code is None:
                raise _Unsupported()
            left = self._build(node.left, rows, kids)
            right = self._build(node.right, rows, kids)
            rows.append((code, left, right, 0))
            return len(rows) - 1
        if isinstance(node, _Like):
            child = self._build(node.operand, rows, kids)
            plan = _LikePlan(node.pattern)
            fullmatch = plan.regex.fullmatch if plan.regex is not None else None
            self._plans.append((_LIKE_KINDS[plan.kind], plan.head, plan.tail, fullmatch))
            rows.append((S_LIKE, child, len(self._plans) - 1, 1 if node.negated else 0))
            return len(rows) - 1
        if isinstance(node, _In):
            child = self._build(node.operand, rows, kids)
            items = [self._build(item, rows, kids) for item in node.items]
            start = len(kids)
            kids.extend(items)
            # c packs count * 2 + negated
            rows.append((S_IN, child, start, len(items) * 2 + (1 if node.negated else 0)))
            return len(rows) - 1
        raise _Unsupported()

    cdef int _ev(self, int n, dict attrs, Val* out) except -1:
        cdef int op = self.op[n]
        cdef PyObject* p
        cdef object v
        cdef int st, ovf, k, count
        cdef Val x, y
        cdef long long iv
        cdef bint found
        if op == S_CONST:
            out.kind = self.ckind[self.a[n]]
            out.i = self.cint[self.a[n]]
            out.s = PyTuple_GET_ITEM(self._const_tuple, self.a[n]) if out.kind == K_STR else NULL
            return R_OK
        if op == S_ATTR:
            p = PyDict_GetItem(attrs, <object>PyTuple_GET_ITEM(self._const_tuple, self.a[n]))
            if p is NULL:
                return R_ERROR
            v = <object>p
            if type(v) is str:
                out.kind = K_STR
                out.s = p
                return R_OK
            if v is True or v is False:
                out.kind = K_BOOL
                out.i = 1 if v is True else 0
                return R_OK
            if v is None:
                return R_ERROR
            if type(v) is int:
                ovf = 0
                iv = PyLong_AsLongLongAndOverflow(v, &ovf)
                if ovf == 0 and INT32_MIN <= iv <= INT32_MAX:
                    out.kind = K_INT
                    out.i = iv
                    return R_OK
            return R_FALLBACK
        if op == S_EXISTS:
            p = PyDict_GetItem(attrs, <object>PyTuple_GET_ITEM(self._const_tuple, self.a[n]))
            out.kind = K_BOOL
            out.i = 0 if (p is NULL or <object>p is None) else 1
            return R_OK
        if op == S_NOT:
            st = self._ev(self.a[n], attrs, &x)
            if st != R_OK:
                return st
            if x.kind != K_BOOL:
                return R_FALLBACK
            out.kind = K_BOOL
            out.i = 1 - x.i
            return R_OK
        if op == S_AND or op == S_OR:
            st = self._ev(self.a[n], attrs, &x)
            if st != R_OK:
                return st
            if x.kind != K_BOOL:
                return R_FALLBACK
            out.kind = K_BOOL
            if op == S_AND and x.i == 0:
                out.i = 0
                return R_OK
            if op == S_OR and x.i == 1:
                out.i = 1
                return R_OK
            st = self._ev(self.b[n], attrs, &y)
            if st != R_OK:
                return st
            if y.kind != K_BOOL:
                return R_FALLBACK
            out.i = y.i
            return R_OK
        if op >= S_EQ and op <= S_GE:
            st = self._ev(self.a[n], attrs, &x)
            if st != R_OK:
                return st
            st = self._ev(self.b[n], attrs, &y)
            if st != R_OK:
                return st
            if x.kind != y.kind:
                return R_FALLBACK
            out.kind = K_BOOL
            if op == S_EQ or op == S_NE:
                if x.kind == K_STR:
                    found = <str>x.s == <str>y.s
                else:
                    found = x.i == y.i
                out.i = 1 if (found != (op == S_NE)) else 0
                return R_OK
            if x.kind != K_INT:
                return R_FALLBACK
            if op == S_LT:
                out.i = x.i < y.i
            elif op == S_LE:
                out.i = x.i <= y.i
            elif op == S_GT:
                out.i = x.i > y.i
            else:
                out.i = x.i >= y.i
            return R_OK
        if op == S_LIKE:
            st = self._ev(self.a[n], attrs, &x)
            if st != R_OK:
                return st
            if x.kind != K_STR:
                return R_FALLBACK
            found = self._like(self.b[n], <str>x.s)
            out.kind = K_BOOL
            out.i = 1 if (found != (self.c[n] != 0)) else 0
            return R_OK
        if op == S_IN:
            st = self._ev(self.a[n], attrs, &x)
            if st != R_OK:
                return st
            count = self.c[n] >> 1
            found = False
            for k in range(count):
                st = self._ev(self.kids[self.b[n] + k], attrs, &y)
                if st != R_OK:
                    return st
                if y.kind != x.kind:
                    return R_FALLBACK
                if not found:
                    if x.kind == K_STR:
                        found = <str>x.s == <str>y.s
                    else:
                        found = x.i == y.i
            out.kind = K_BOOL
            out.i = 1 if (found != ((self.c[n] & 1) != 0)) else 0
            return R_OK
        return R_FALLBACK

    cdef bint _like(self, int plan_index, str s) except -1:
        cdef tuple plan = <tuple>self._plans[plan_index]
        cdef int kind = plan[0]
        cdef str head = plan[1]
        cdef str tail = plan[2]
        if kind == L_EXACT:
            return s == head
        if kind == L_PREFIX:
            return s.startswith(head)
        if kind == L_SUFFIX:
            return s.endswith(tail)
        if kind == L_CONTAINS:
            return head in s
        if kind == L_ENDS:
            return (PyUnicode_GET_LENGTH(s) >= PyUnicode_GET_LENGTH(head) + PyUnicode_GET_LENGTH(tail)
                    and s.startswith(head) and s.endswith(tail))
        return plan[3](s) is not None

    cdef bint match(self, dict attrs) except -1:
        cdef Val v
        cdef int st
        if not self.native:
            return self._matches(attrs)
        st = self._ev(self.root, attrs, &v)
        if st == R_OK:
            return v.kind == K_BOOL and v.i == 1
        if st == R_ERROR:
            return False
        return self._matches(attrs)

    def matches(self, attrs):
        """`Expression.matches(attrs)`: Boolean true with no error."""
        if type(attrs) is not dict:
            return self._matches(attrs)
        return self.match(<dict>attrs)


def compile_sql(expression):
    """The native program of a compiled CESQL `Expression` (`.native` tells whether it runs natively)."""
    return SqlProgram(expression)


# --------------------------------------------------------------------------------------------------
# Helpers: event size and the split point, as in router/cost.py and router/decide.py

cdef uint32_t _CRC[256]


cdef void _crc_init():
    cdef uint32_t c
    cdef int i, j
    for i in range(256):
        c = i
        for j in range(8):
            if c & 1:
                c = 0xEDB88320 ^ (c >> 1)
            else:
                c = c >> 1
        _CRC[i] = c


_crc_init()


cdef uint32_t _crc32(const unsigned char* data, Py_ssize_t size) noexcept:
    cdef uint32_t c = 0xFFFFFFFF
    cdef Py_ssize_t i
    for i in range(size):
        c = _CRC[(c ^ data[i]) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


cdef double _split_point(dict attrs, object pure) except? -1.0:
    cdef PyObject* p = PyDict_GetItem(attrs, _PARTITIONKEY)
    cdef object key
    cdef const char* buf
    cdef Py_ssize_t size = 0
    if p is NULL or <object>p is None:
        p = PyDict_GetItem(attrs, _ID)
        key = "" if p is NULL else <object>p
    else:
        key = <object>p
    if type(key) is str:
        try:
            buf = PyUnicode_AsUTF8AndSize(key, &size)
        except UnicodeError:
            return pure(attrs)  # raises exactly as the reference does
        return _crc32(<const unsigned char*>buf, size) / 4294967296.0
    if type(key) is bytes:
        return _crc32(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) / 4294967296.0
    return pure(attrs)


cdef Py_ssize_t _event_size(object event) except -1:
    cdef dict attrs = event.attributes
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef Py_ssize_t size = 0
    while PyDict_Next(attrs, &pos, &k, &v):
        size += len(<object>k)
        if type(<object>v) is str:
            size += PyUnicode_GET_LENGTH(<object>v)
        else:
            size += 8
    if event.raw_data is not None:  # its JSON text, without parsing an unread event's data
        return size + len(event.raw_data)
    data = event.data
    if data is None:
        return size
    if type(data) is bytes or type(data) is str:
        return size + len(data)
    return size + _json_size(data)


cdef list _views(dict attrs, str value):
    """`router.filters.regulation_views` for a str `dataregulation` that lists several entries (or is
    padded): one copy of the attributes per entry; None when there is no entry."""
    cdef list out = []
    cdef dict view
    cdef str part, entry
    for part in value.split(","):
        entry = part.strip()
        if entry:
            view = attrs.copy()
            view[_LIST_ATTRIBUTE] = entry
            out.append(view)
    return out or None


def regulation_views(attrs):
    """`umcef.router.filters.regulation_views`, natively (tests)."""
    value = attrs.get(_LIST_ATTRIBUTE)
    if type(value) is not str or ("," not in value and value == value.strip()):
        return None
    return _views(attrs, value)


def event_size(event):
    """`umcef.router.cost.event_size` (for events whose attributes are a dict)."""
    return _event_size(event)


# --------------------------------------------------------------------------------------------------
# The table


cdef inline int _alloc_fail() except -1:
    raise MemoryError()


cdef class NativeTable:
    """A `RouteTable` in C arrays, plus its CESQL programs. Immutable once built."""

    cdef readonly object table
    cdef int nroutes, nwords, ndests, npolicies, nnodes, default_route
    cdef uint64_t all_mask, unmatched_mask
    # dispatch: row 0 = residual, then one row per type_exact / type_prefix key
    cdef uint64_t* rows
    cdef dict type_exact    # str -> row
    cdef dict type_prefix   # str -> row
    cdef tuple prefix_lengths
    cdef Py_ssize_t* plen
    cdef int nplen
    # destinations
    cdef uint64_t* dest_jmask
    cdef Py_ssize_t* dest_slot
    cdef double* per_byte
    cdef double* per_request
    cdef double* weight
    # nodes
    cdef int* nop
    cdef int* na
    cdef int* nb
    cdef int* nkids
    cdef tuple strings
    cdef list sql           # SqlProgram per sql index
    # routes
    cdef int* rfilter
    cdef int* rmode
    cdef int* rstart
    cdef int* rcount
    cdef int* rdests
    cdef double* w_lat
    cdef double* w_cost
    cdef double* max_rtt
    cdef double* margin
    cdef double* dwell
    cdef tuple route_names
    # residency
    cdef int* pfilter
    cdef uint64_t* pallow
    cdef object _pure_split
    # the router state this table decides with, bound on first use (see _bind)
    cdef object _router, _active, _est
    cdef array _rtt, _up, _admit
    cdef tuple _single, _all_cache
    cdef dict _hysteresis
    # dispatch memo: type string -> row of the candidate mask (bounded; types are few in practice)
    cdef dict _memo
    cdef uint64_t* _memo_rows
    cdef int _memo_cap

    def __cinit__(self):
        self.rows = NULL
        self.plen = NULL
        self.dest_jmask = NULL
        self.dest_slot = NULL
        self.per_byte = self.per_request = self.weight = NULL
        self.nop = self.na = self.nb = self.nkids = NULL
        self.rfilter = self.rmode = self.rstart = self.rcount = self.rdests = NULL
        self.w_lat = self.w_cost = self.max_rtt = self.margin = self.dwell = NULL
        self.pfilter = NULL
        self.pallow = NULL
        self._memo_rows = NULL

    def __dealloc__(self):
        free(self.rows); free(self.plen); free(self.dest_jmask); free(self.dest_slot)
        free(self.per_byte); free(self.per_request); free(self.weight)
        free(self.nop); free(self.na); free(self.nb); free(self.nkids)
        free(self.rfilter); free(self.rmode); free(self.rstart); free(self.rcount); free(self.rdests)
        free(self.w_lat); free(self.w_cost); free(self.max_rtt); free(self.margin); free(self.dwell)
        free(self.pfilter); free(self.pallow); free(self._memo_rows)

    def __init__(self, table):
        """Compile `table`. Raises ValueError when it is outside what the twin handles (more than 64
        jurisdictions); the router then keeps the pure path for that table."""
        global _Decision
        if _Decision is None:
            from umcef.router.decide import Decision
            _Decision = Decision
        from umcef.router.decide import split_point
        self._pure_split = split_point
        if len(table.jurisdictions) > 64:
            raise ValueError("more than 64 jurisdictions: the native router handles masks of one word")
        self.table = table
        cdef int i, j, w
        self.nroutes = len(table.route_names)
        self.nwords = (self.nroutes + 63) // 64
        self.default_route = table.default_route
        self.all_mask = table.all_mask
        self.unmatched_mask = table.unmatched_mask
        self.route_names = tuple(table.route_names)

        # dispatch rows
        self.type_exact = {}
        self.type_prefix = {}
        masks = [table.residual_mask]
        for key, m in table.type_exact.items():
            self.type_exact[key] = len(masks)
            masks.append(m)
        for key, m in table.type_prefix.items():
            self.type_prefix[key] = len(masks)
            masks.append(m)
        self.rows = <uint64_t*>malloc(sizeof(uint64_t) * len(masks) * self.nwords + 8)
        if self.rows is NULL:
            _alloc_fail()
        for i, m in enumerate(masks):
            for w in range(self.nwords):
                self.rows[i * self.nwords + w] = (m >> (64 * w)) & 0xFFFFFFFFFFFFFFFF
        self.nplen = len(table.prefix_lengths)
        self.plen = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (self.nplen + 1))
        for i, length in enumerate(table.prefix_lengths):
            self.plen[i] = length

        # destinations
        self.ndests = len(table.dest_names)
        n = self.ndests + 1
        self.dest_jmask = <uint64_t*>malloc(sizeof(uint64_t) * n)
        self.dest_slot = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * n)
        self.per_byte = <double*>malloc(sizeof(double) * n)
        self.per_request = <double*>malloc(sizeof(double) * n)
        self.weight = <double*>malloc(sizeof(double) * n)
        if not (self.dest_jmask and self.dest_slot and self.per_byte and self.per_request and self.weight):
            _alloc_fail()
        for i in range(self.ndests):
            self.dest_jmask[i] = table.dest_jmask[i]
            self.dest_slot[i] = table.dest_slot[i]
            self.per_byte[i] = table.dest_usd_per_byte[i]
            self.per_request[i] = table.dest_usd_per_request[i]
            self.weight[i] = table.dest_weight[i]

        # filter nodes
        nodes = table.nodes
        self.nnodes = len(nodes.op)
        n = self.nnodes + 1
        self.nop = <int*>malloc(sizeof(int) * n)
        self.na = <int*>malloc(sizeof(int) * n)
        self.nb = <int*>malloc(sizeof(int) * n)
        self.nkids = <int*>malloc(sizeof(int) * (len(nodes.kids) + 1))
        if not (self.nop and self.na and self.nb and self.nkids):
            _alloc_fail()
        for i in range(self.nnodes):
            self.nop[i] = nodes.op[i]
            self.na[i] = nodes.a[i]
            self.nb[i] = nodes.b[i]
        for i, k in enumerate(nodes.kids):
            self.nkids[i] = k
        self.strings = tuple(nodes.strings)
        self.sql = [compile_sql(e) for e in nodes.sql]

        # routes
        n = self.nroutes + 1
        self.rfilter = <int*>malloc(sizeof(int) * n)
        self.rmode = <int*>malloc(sizeof(int) * n)
        self.rstart = <int*>malloc(sizeof(int) * n)
        self.rcount = <int*>malloc(sizeof(int) * n)
        self.rdests = <int*>malloc(sizeof(int) * (len(table.route_dests) + 1))
        self.w_lat = <double*>malloc(sizeof(double) * n)
        self.w_cost = <double*>malloc(sizeof(double) * n)
        self.max_rtt = <double*>malloc(sizeof(double) * n)
        self.margin = <double*>malloc(sizeof(double) * n)
        self.dwell = <double*>malloc(sizeof(double) * n)
        if not (self.rfilter and self.rmode and self.rstart and self.rcount and self.rdests and self.w_lat
                and self.w_cost and self.max_rtt and self.margin and self.dwell):
            _alloc_fail()
        for i in range(self.nroutes):
            self.rfilter[i] = table.route_filter[i]
            self.rmode[i] = table.route_mode[i]
            self.rstart[i] = table.route_start[i]
            self.rcount[i] = table.route_count[i]
            self.w_lat[i] = table.route_w_latency[i]
            self.w_cost[i] = table.route_w_cost[i]
            self.max_rtt[i] = table.route_max_rtt_ms[i]
            self.margin[i] = table.route_margin[i]
            self.dwell[i] = table.route_dwell_s[i]
        for i, d in enumerate(table.route_dests):
            self.rdests[i] = d

        # residency
        self.npolicies = len(table.policy_filter)
        self.pfilter = <int*>malloc(sizeof(int) * (self.npolicies + 1))
        self.pallow = <uint64_t*>malloc(sizeof(uint64_t) * (self.npolicies + 1))
        for i in range(self.npolicies):
            self.pfilter[i] = table.policy_filter[i]
            self.pallow[i] = table.policy_allow[i]
        self._memo = {}
        self._memo_cap = min(4096, max(64, 65536 // self.nwords))

    cdef int _bind(self, router, active) except -1:
        """Cache the router's state objects: the estimator's arrays (appended to, never replaced: the
        buffer pointers are still read on every decision) and the `_Active`'s caches and hysteresis map
        (created once with it). Re-bound whenever a different router, `_Active` or estimator shows up."""
        est = router.estimator
        self._rtt = est.rtt_ms
        self._up = est.up
        self._admit = est.admit
        self._est = est
        self._single = active.single
        self._all_cache = active.all_cache
        self._hysteresis = active.hysteresis
        self._router = router
        self._active = active
        return 0

    cdef int _dispatch(self, object kind, uint64_t* m) except -1:
        """The candidate mask for a `type` string (residual | exact hit | prefix hits), memoised."""
        cdef int nw = self.nwords
        cdef int w, i, row
        cdef Py_ssize_t n, length
        cdef uint64_t* dst
        memo = self._memo.get(kind)
        if memo is not None:
            dst = self._memo_rows + (<int>memo) * nw
            for w in range(nw):
                m[w] = dst[w]
            return 0
        for w in range(nw):
            m[w] = self.rows[w]
        hit = self.type_exact.get(kind)
        if hit is not None:
            self._or_row(m, <int>hit)
        if self.nplen:
            n = PyUnicode_GET_LENGTH(kind)
            for i in range(self.nplen):
                length = self.plen[i]
                if length > n:
                    break
                hit = self.type_prefix.get((<str>kind)[:length])
                if hit is not None:
                    self._or_row(m, <int>hit)
        row = len(self._memo)
        if row < self._memo_cap:
            if self._memo_rows is NULL:
                self._memo_rows = <uint64_t*>malloc(sizeof(uint64_t) * self._memo_cap * nw)
                if self._memo_rows is NULL:
                    return 0
            dst = self._memo_rows + row * nw
            for w in range(nw):
                dst[w] = m[w]
            self._memo[kind] = row
        return 0

    @property
    def sql_programs(self):
        return tuple(self.sql)

    # -- filters -------------------------------------------------------------------------------

    cdef int _node(self, int n, dict attrs) except -1:
        cdef int op = self.nop[n]
        cdef int k, start, count
        cdef PyObject* p
        cdef object v
        cdef str s
        if op == OP_TRUE:
            return 1
        if op <= OP_SUFFIX:
            p = PyDict_GetItem(attrs, <object>PyTuple_GET_ITEM(self.strings, self.na[n]))
            if p is NULL:
                return 0
            v = <object>p
            if type(v) is str:
                s = <str>v
            elif v is None:
                return 0
            else:
                s = _attribute_to_string(v)
            if op == OP_EXACT:
                return s == <str>PyTuple_GET_ITEM(self.strings, self.nb[n])
            if op == OP_PREFIX:
                return s.startswith(<str>PyTuple_GET_ITEM(self.strings, self.nb[n]))
            return s.endswith(<str>PyTuple_GET_ITEM(self.strings, self.nb[n]))
        if op == OP_ALL:
            start = self.na[n]
            count = self.nb[n]
            for k in range(start, start + count):
                if not self._node(self.nkids[k], attrs):
                    return 0
            return 1
        if op == OP_ANY:
            start = self.na[n]
            count = self.nb[n]
            for k in range(start, start + count):
                if self._node(self.nkids[k], attrs):
                    return 1
            return 0
        if op == OP_NOT:
            return 0 if self._node(self.na[n], attrs) else 1
        if op == OP_SQL:
            return (<SqlProgram>self.sql[self.na[n]]).match(attrs)
        raise ValueError(f"unknown filter op {op}")

    def filter_matches(self, int root, attrs):
        """The filter rooted at node `root` on `attrs` (tests and the benchmark)."""
        return bool(self._node(root, <dict?>attrs))

    cdef uint64_t _allowed(self, dict attrs) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t mask
        cdef bint hit = False
        cdef int p
        cdef PyObject* reg
        cdef object value
        if self.npolicies == 0:
            return self.unmatched_mask
        mask = self.all_mask
        views = None
        reg = PyDict_GetItem(attrs, _LIST_ATTRIBUTE)
        if reg is not NULL:
            value = <object>reg
            if type(value) is str and ("," in <str>value or <str>value != (<str>value).strip()):
                views = _views(attrs, <str>value)
        if views is None:
            for p in range(self.npolicies):
                if self._node(self.pfilter[p], attrs):
                    mask &= self.pallow[p]
                    hit = True
                    if mask == 0:
                        break  # nothing can come back: the answer is 0 whatever else matches
        else:
            for view in views:
                for p in range(self.npolicies):
                    if self._node(self.pfilter[p], <dict>view):
                        mask &= self.pallow[p]
                        hit = True
                if hit and mask == 0:
                    break
        return mask if hit else self.unmatched_mask

    def allowed(self, attrs):
        """The jurisdiction mask residency allows (`Router._allowed`)."""
        return PyLong_FromUnsignedLongLong(self._allowed(<dict?>attrs))

    # -- the decision ----------------------------------------------------------------------------

    def decide(self, router, active, event, now=None, size=None):
        """`router._decide(active, event, False, now, size)`, natively. `active` is the router's
        `_Active` for this table (its cached decisions and hysteresis state)."""
        return self._decide(router, active, event, now, size)

    cdef object _decide(self, router, active, event, now, size):
        cdef object attrs_obj = event.attributes
        if type(attrs_obj) is not dict or active.table is not self.table:
            # not a plain dict, or the active table object was replaced without a swap (tests do
            # this to the reference): the pure reference decides
            return router._decide(active, event, False, now, size)
        cdef dict attrs = <dict>attrs_obj
        if active is not self._active or router is not self._router or router.estimator is not self._est:
            self._bind(router, active)
        cdef uint64_t local[16]
        cdef uint64_t* m = local
        cdef int nw = self.nwords
        cdef int w, r, i, first = -1
        cdef Py_ssize_t n, length
        cdef uint64_t word
        cdef PyObject* p
        cdef object kind, hit
        cdef list others = None
        if nw > 16:
            m = <uint64_t*>malloc(sizeof(uint64_t) * nw)
            if m is NULL:
                _alloc_fail()
        try:
            p = PyDict_GetItem(attrs, _TYPE)
            if p is not NULL and type(<object>p) is str:
                self._dispatch(<object>p, m)
            else:
                for w in range(nw):
                    m[w] = self.rows[w]
            for w in range(nw):
                word = m[w]
                while word:
                    r = w * 64 + umcef_ctz64(word)
                    word &= word - 1
                    if self.rfilter[r] < 0 or self._node(self.rfilter[r], attrs):
                        if first < 0:
                            first = r
                        elif others is None:
                            others = [r]
                        else:
                            others.append(r)
        finally:
            if m is not local:
                free(m)
        if first < 0:
            first = self.default_route
        cdef uint64_t allowed = self._allowed(attrs)
        if others is None:
            return self._route(router, active, first, allowed, event, attrs, now, size)
        matched = [first]
        matched.extend(others)
        results = [self._route(router, active, rr, allowed, event, attrs, now, size) for rr in matched]
        chosen = []
        held = None  # joined like the reference's "; ".join(...) (no allocation unless a route holds)
        for res in results:
            for d in res.destinations:
                if d not in chosen:
                    chosen.append(d)
            if res.held is not None:
                held = res.held if held is None else held + "; " + res.held
        reasons = [res.reason for res in results if res.reason is not None]
        return _Decision(tuple(chosen), tuple([self.route_names[rr] for rr in matched]),
                         "; ".join(reasons) or None, None, held)

    cdef inline void _or_row(self, uint64_t* m, int row) noexcept:
        cdef int w
        cdef uint64_t* src = self.rows + row * self.nwords
        for w in range(self.nwords):
            m[w] |= src[w]

    cdef object _route(self, router, active, int r, uint64_t allowed, event, dict attrs, now, size):
        cdef int mode = self.rmode[r]
        cdef int start = self.rstart[r]
        cdef int end = start + self.rcount[r]
        cdef int k, d, count, only, best, last
        cdef Py_ssize_t s
        cdef double mx, lat, c, max_lat, max_cost, total, point, acc, lat_scale, cost_scale, score
        cdef double best_score, current_score, current, nbytes, t_now
        cdef int64_t isize = -1
        cdef tuple single
        cdef list state
        if mode == MODE_ALL:
            cache = self._all_cache[r]
            key = PyLong_FromUnsignedLongLong(allowed)
            cached = (<dict>cache).get(key)
            if cached is None:
                return router._route(active, r, key, event, now, size)
            return cached
        cdef double* rtt_d = self._rtt.data.as_doubles
        cdef signed char* up_b = self._up.data.as_schars
        cdef double* admit_d = self._admit.data.as_doubles
        mx = self.max_rtt[r]
        single = self._single
        if mode == MODE_FAILOVER:
            for k in range(start, end):
                d = self.rdests[k]
                if self.dest_jmask[d] & allowed:
                    s = self.dest_slot[d]
                    if up_b[s] and rtt_d[s] <= mx:
                        return <object>PyTuple_GET_ITEM(single, k)
            return self._hold(router, active, r, allowed, event, size)
        if mode == MODE_SPLIT:
            total = 0.0
            for k in range(start, end):
                d = self.rdests[k]
                if self.dest_jmask[d] & allowed:
                    s = self.dest_slot[d]
                    if up_b[s] and rtt_d[s] <= mx:
                        total += self.weight[d] * admit_d[s]
            if total <= 0.0:
                return self._hold(router, active, r, allowed, event, size)
            point = _split_point(attrs, self._pure_split) * total
            acc = 0.0
            last = -1
            for k in range(start, end):
                d = self.rdests[k]
                if self.dest_jmask[d] & allowed:
                    s = self.dest_slot[d]
                    if up_b[s] and rtt_d[s] <= mx:
                        acc += self.weight[d] * admit_d[s]
                        last = k
                        if point < acc:
                            return <object>PyTuple_GET_ITEM(single, k)
            return <object>PyTuple_GET_ITEM(single, last)
        # MODE_BEST
        cdef double wl = self.w_lat[r]
        cdef double wc = self.w_cost[r]
        if size is not None:
            isize = size
        count = 0
        only = -1
        max_lat = 0.0
        max_cost = 0.0
        for k in range(start, end):
            d = self.rdests[k]
            if self.dest_jmask[d] & allowed:
                s = self.dest_slot[d]
                if up_b[s] and rtt_d[s] <= mx:
                    count += 1
                    only = k
                    lat = rtt_d[s] / admit_d[s]
                    if lat > max_lat:
                        max_lat = lat
        if count == 0:
            return self._hold(router, active, r, allowed, event, size)
        if wc > 0.0 and count > 1:  # the size only matters when two or more candidates are scored
            if isize < 0:
                isize = _event_size(event)
            for k in range(start, end):
                d = self.rdests[k]
                if self.dest_jmask[d] & allowed:
                    s = self.dest_slot[d]
                    if up_b[s] and rtt_d[s] <= mx:
                        c = isize * self.per_byte[d] + self.per_request[d]
                        if c > max_cost:
                            max_cost = c
        nbytes = 0.0 if isize < 0 else <double>isize
        hyst = self._hysteresis
        if allowed < (<uint64_t>1 << 62) // <uint64_t>self.nroutes:
            key = PyLong_FromUnsignedLongLong(allowed * <uint64_t>self.nroutes + <uint64_t>r)
        else:
            key = PyLong_FromUnsignedLongLong(allowed) * self.nroutes + r
        st = (<dict>hyst).get(key)
        if st is None:
            state = [-1.0, -1.0, 0.0]
            (<dict>hyst)[key] = state
        else:
            state = <list>st
        if count == 1:
            state[0] = only
            state[1] = -1.0
            return <object>PyTuple_GET_ITEM(single, only)
        current = state[0]
        best = -1
        best_score = float("inf")
        current_score = -1.0
        lat_scale = wl / max_lat if max_lat > 0.0 else 0.0
        cost_scale = wc / max_cost if max_cost > 0.0 else 0.0
        for k in range(start, end):
            d = self.rdests[k]
            if self.dest_jmask[d] & allowed:
                s = self.dest_slot[d]
                if up_b[s] and rtt_d[s] <= mx:
                    score = rtt_d[s] / admit_d[s] * lat_scale
                    if cost_scale != 0.0:
                        score += (nbytes * self.per_byte[d] + self.per_request[d]) * cost_scale
                    if score < best_score:
                        best_score = score
                        best = k
                    if k == current:
                        current_score = score
        if current_score < 0.0:
            state[0] = best
            state[1] = -1.0
            return <object>PyTuple_GET_ITEM(single, best)
        if best == current or not best_score < current_score * (1.0 - self.margin[r]):
            state[1] = -1.0
            return <object>PyTuple_GET_ITEM(single, <Py_ssize_t>current)
        if self.dwell[r] > 0.0:
            if now is None:
                now = router.clock()
            if state[1] != best:
                state[1] = best
                state[2] = now
                return <object>PyTuple_GET_ITEM(single, <Py_ssize_t>current)
            if now - state[2] < self.dwell[r]:
                return <object>PyTuple_GET_ITEM(single, <Py_ssize_t>current)
        state[0] = best
        state[1] = -1.0
        return <object>PyTuple_GET_ITEM(single, best)

    cdef object _hold(self, router, active, int r, uint64_t allowed, event, size):
        # no allowed destination is healthy: hold for one, or nothing is allowed (rare: the reference's code)
        return router._hold(active, r, PyLong_FromUnsignedLongLong(allowed), event, size)


cdef class Decider:
    """`Router.decide` without the Python frame: `Router` installs one as its instance's `decide` when
    the twin is selected. Reads the active table once per call (atomic swaps), hands explain requests
    and tables without a native twin to the pure reference (`Router._decide`)."""

    cdef object router

    def __init__(self, router):
        self.router = router

    def __call__(self, event, *, bint explain=False, now=None, size=None):
        router = self.router
        active = router.holder.active
        native = active.native
        if explain or native is None:
            return router._decide(active, event, explain, now, size)
        return (<NativeTable?>native)._decide(router, active, event, now, size)
