"""Node inputs and their /prompt-time validation, both read from wan22.request.spec (nothing ComfyUI-specific is imported).

ComfyUI skips its own combo check (and, on newer servers, its min/max check) for every input that
VALIDATE_INPUTS names in its signature, so the generated validator names each spec input of the node: the
message a caller sees is the spec's, the same as on the CLI and the worker. Linked inputs arrive as None
during validation and are checked when the node runs.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..wan22.request import spec
from ..wan22.request.errors import InvalidParameter

COMFY_TYPES = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "text": "STRING", "size": "STRING"}


def node_inputs(node: str, choices: Mapping[str, List[str]] = {}) -> Dict[str, Tuple[Any, dict]]:
    """`node`'s spec parameters as ComfyUI input declarations, in spec order. `choices` turns a text
    parameter into a dropdown whose entries are only known at run time (model sets on disk)."""
    inputs: Dict[str, Tuple[Any, dict]] = {}
    for p in spec.node_params(node):
        options: Dict[str, Any] = {"tooltip": p.doc}
        if p.name not in choices or p.default in choices[p.name]:
            options["default"] = p.default
        if p.kind in ("int", "float"):
            options.update(min=p.low, max=p.high)
        options.update(p.widget)
        if p.name in choices:
            kind: Any = list(choices[p.name])
        elif p.kind == "choice":
            kind = list(p.choices)
        else:
            kind = COMFY_TYPES[p.kind]
        inputs[p.name] = (kind, options)
    return inputs


def spec_validator(node: str, skip: Iterable[str] = (),
                   also: Optional[Callable[[Dict[str, Any]], List[Tuple[str, str]]]] = None):
    """A VALIDATE_INPUTS classmethod checking `node`'s spec inputs (all problems in one message).
    `skip`: inputs left to ComfyUI (dynamic dropdowns); `also(values)`: the node's own cross-input rules."""
    names = [p.name for p in spec.node_params(node) if p.name not in set(skip)]

    def VALIDATE_INPUTS(cls, **given):  # noqa: N802 - ComfyUI's name
        problems: List[Tuple[str, str]] = []
        values = {name: given.get(name) for name in names}
        for name, value in values.items():
            if value is None:
                continue
            try:
                values[name] = spec.check(name, value)
            except InvalidParameter as exc:
                problems += exc.problems
        if also is not None and not problems:
            problems += also(values)
        return InvalidParameter.from_problems(problems).message if problems else True

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    VALIDATE_INPUTS.__signature__ = inspect.Signature(params)
    return classmethod(VALIDATE_INPUTS)
