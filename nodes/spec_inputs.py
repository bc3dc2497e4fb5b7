"""Node inputs and their /prompt-time validation, both read from wan22.request.spec (nothing ComfyUI-specific is imported).

ComfyUI skips its own combo check (and, on newer servers, its min/max check) for every input that
VALIDATE_INPUTS names in its signature, and reports a failure under each of them; so the generated validator
names the inputs at fault when there are any (each problem is reported once, under its own input) and every
spec input of the node otherwise: the message a caller sees is the spec's, the same as on the CLI and the
worker. Linked inputs arrive as None during validation and are checked when the node runs.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..wan22.request import spec
from ..wan22.request.errors import InvalidParameter

COMFY_TYPES = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "text": "STRING", "size": "STRING", "prompts": "STRING"}


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


def _inputs_being_validated() -> Optional[Dict[str, Any]]:
    """The prompt inputs of the node ComfyUI is validating now: the ``inputs`` local of the innermost
    ``execution.validate_inputs`` frame on the stack (the same name in the 2024 server and in 0.3.x), else None."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "validate_inputs" and isinstance(frame.f_locals.get("inputs"), dict):
            return frame.f_locals["inputs"]
        frame = frame.f_back
    return None


class _SpecValidator:
    """VALIDATE_INPUTS of a node: checks `names` with the spec, then `also(values)` (cross-input rules).

    ComfyUI (2024 and 0.3.x alike) calls VALIDATE_INPUTS once with the inputs its signature names and, when it
    returns a message, reports that message once under EVERY one of those inputs: one problem shown nine times,
    under the wrong names. So the signature is read per node while ComfyUI validates it: when the node's inputs
    have problems it names only the inputs at fault (each is reported once, under its own name); otherwise it names
    every spec input (ComfyUI then skips its own combo and min/max checks for them, the spec's being the same).
    """

    def __init__(self, node: str, names: List[str],
                 also: Optional[Callable[[Dict[str, Any]], List[Tuple[str, str]]]]):
        self.node, self.names, self.also = node, names, also

    def problems(self, given: Mapping[str, Any]) -> List[Tuple[str, str]]:
        problems: List[Tuple[str, str]] = []
        # a linked input is [node id, slot] in the prompt and None in VALIDATE_INPUTS: checked when the node runs
        values = {n: (None if isinstance(given.get(n), list) else given.get(n)) for n in self.names}
        for name, value in values.items():
            if value is None:
                continue
            try:
                values[name] = spec.check(name, value)
            except InvalidParameter as exc:
                problems += exc.problems
        if self.also is not None and not problems:
            problems += self.also(values)
        return problems

    @property
    def __signature__(self) -> inspect.Signature:  # read by ComfyUI's inspect.getfullargspec, node by node
        inputs = _inputs_being_validated()
        at_fault = {name for name, _ in self.problems(inputs)} if inputs is not None else set()
        named = [n for n in self.names if n in at_fault] if at_fault <= set(self.names) and at_fault else self.names
        return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                                  for n in named])

    def __call__(self, **given):
        values = dict(_inputs_being_validated() or {})
        values.update({k: v for k, v in given.items() if v is not None})
        problems = self.problems(values)
        return InvalidParameter.from_problems(problems).message if problems else True


def spec_validator(node: str, skip: Iterable[str] = (),
                   also: Optional[Callable[[Dict[str, Any]], List[Tuple[str, str]]]] = None) -> _SpecValidator:
    """VALIDATE_INPUTS for `node`'s spec inputs (see _SpecValidator). `skip`: inputs left to ComfyUI (dynamic
    dropdowns); `also(values)`: the node's own cross-input rules, returning (input, why) problems."""
    return _SpecValidator(node, [p.name for p in spec.node_params(node) if p.name not in set(skip)], also)
