"""CloudEvents SQL (CESQL) v1: parser, type system, built-in functions and a compiled evaluator.

    from umcef.router.cesql import compile_expression

    expr = compile_expression("type LIKE 'com.example.order.%' AND dataregulation = 'GDPR'")
    expr.matches(event.attributes)        # filter semantics: Boolean true and no error
    result = expr.evaluate(event.attributes)
    result.value, result.errors           # value plus the errors collected on the way

See docs/cesql.md for the semantics chosen where the spec leaves room.
"""

from .evaluate import (
    REQUIRED_ATTRIBUTES,
    Expression,
    LikePlan,
    Result,
    compile_ast,
    compile_expression,
    evaluate,
    like_matcher,
)
from .functions import (
    BUILTINS,
    DEFAULT_REGISTRY,
    Function,
    FunctionDefinitionError,
    FunctionFailure,
    FunctionRegistry,
)
from .parser import (
    Binary,
    BinaryOp,
    BooleanLiteral,
    Call,
    Exists,
    Identifier,
    In,
    IntegerLiteral,
    Like,
    Node,
    StringLiteral,
    Unary,
    UnaryOp,
    parse,
    to_text,
)
from .types import (
    INT32_MAX,
    INT32_MIN,
    CastError,
    CesqlError,
    CesqlParseError,
    FunctionEvaluationError,
    GenericError,
    MathError,
    MissingAttributeError,
    MissingFunctionError,
    ParseError,
    Type,
    Value,
)

__all__ = [
    "BUILTINS",
    "DEFAULT_REGISTRY",
    "INT32_MAX",
    "INT32_MIN",
    "REQUIRED_ATTRIBUTES",
    "Binary",
    "BinaryOp",
    "BooleanLiteral",
    "Call",
    "CastError",
    "CesqlError",
    "CesqlParseError",
    "Exists",
    "Expression",
    "Function",
    "FunctionDefinitionError",
    "FunctionEvaluationError",
    "FunctionFailure",
    "FunctionRegistry",
    "GenericError",
    "Identifier",
    "In",
    "IntegerLiteral",
    "Like",
    "LikePlan",
    "MathError",
    "MissingAttributeError",
    "MissingFunctionError",
    "Node",
    "ParseError",
    "Result",
    "StringLiteral",
    "Type",
    "Unary",
    "UnaryOp",
    "Value",
    "compile_ast",
    "compile_expression",
    "evaluate",
    "like_matcher",
    "parse",
    "to_text",
]
