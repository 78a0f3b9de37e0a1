"""Trace a dense backbone with ``torch.fx`` up to its feature levels.

The tracer keeps as leaves the modules of the op table, timm's own no-trace modules (e.g. ``BatchNormAct2d``) and
torch's layers, and steps into every other module (blocks, stages, ``Sequential``), so a new family built from
known operations converts without new code. Its graph ends at the modules named by the chosen feature levels; the
rest (pooling head, classifier) is dropped.
"""

from __future__ import annotations

import inspect

import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch import nn

from sparkme.convert.op_table import MODULE_OPS
from sparkme.errors import UsageError

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _BackboneTracer(fx.Tracer):
    """Records the output of every module call, so feature levels can be picked by module name."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self.module_outputs: dict[str, fx.Proxy] = {}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if type(module) in MODULE_OPS or timm_fx.is_notrace_module(type(module)):
            return True
        if isinstance(module, CONTAINERS):
            return False
        # torch's own layers stay whole, so an unsupported one is refused by its name
        return type(module).__module__.startswith("torch.nn")

    def call_module(self, module, forward, args, kwargs):
        out = super().call_module(module, forward, args, kwargs)
        self.module_outputs[self.path_of_module(module)] = out
        return out


def optional_arguments(model: nn.Module) -> dict:
    """``forward``'s parameters after the input that have defaults, bound to them: a flag such as SparK's
    ``forward(x, hierarchical=False)`` or ``forward(x, return_features=False)`` then selects its branch at trace
    time instead of being a traced value that control flow cannot read."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace_to_features(model: nn.Module, module_names: list[str]) -> fx.GraphModule:
    """``model``'s graph with the outputs of ``module_names`` as its outputs, pruned of everything after them.

    Returns:
        a ``GraphModule`` whose graph has one input (the image batch ``(B, 3, H, W)``) and returns a tuple of the
        named modules' outputs; it holds only the submodules and attributes the pruned graph uses, under their own
        dotted names (so its state dict keys are the dense model's).
    """
    tracer = _BackboneTracer()
    try:
        graph = tracer.trace(model, concrete_args=optional_arguments(model))
    except Exception as error:  # fx raises many types; the user needs the model name and the reason
        raise UsageError(f"cannot trace {type(model).__name__} with torch.fx: {error}") from error
    outputs = []
    for name in module_names:
        if name not in tracer.module_outputs:
            raise UsageError(f"feature module {name!r} of {type(model).__name__} is never called in its forward")
        outputs.append(tracer.module_outputs[name].node)
    old_output = next(node for node in graph.nodes if node.op == "output")
    with graph.inserting_after(old_output):
        graph.output(tuple(outputs))
    graph.erase_node(old_output)
    needed = _ancestors(next(node for node in graph.nodes if node.op == "output"))
    image = next(node for node in graph.nodes if node.op == "placeholder")
    for node in reversed(list(graph.nodes)):
        # Bound optional arguments leave placeholders (and fx's checks of their values) that nothing needs now.
        if node not in needed and node is not image:
            graph.erase_node(node)
    # Bound arguments also give the graph a code generator that flattens the original signature: back to one input.
    graph.set_codegen(fx.graph.CodeGen())
    graph.lint()
    return fx.GraphModule(model, graph)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen
