"""Trace a dense backbone with ``torch.fx`` up to its four feature levels, check every node against the sparse op
table, and run the checked graph on sparse maps.

The tracer keeps as leaves the modules of the op table, timm's own no-trace modules (e.g. ``BatchNormAct2d``) and
torch's layers, and steps into every other module (blocks, stages, ``Sequential``), so a new family built from
known operations converts without new code. Its graph ends at the modules named by the chosen feature levels; the
rest (pooling head, classifier) is dropped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch import nn

from sparkme.errors import UsageError
from sparkme.models.sparse_ops import (
    DENSE,
    FUNCTION_OPS,
    MAP,
    MAPS,
    METHOD_OPS,
    MODULE_OPS,
    SparseOp,
    module_op,
    supported_names,
)
from sparkme.sparse.base import SparseMap

RUN = "sparkme_run"  # node.meta key: the SparseOp.run of a node that reads a sparse map (None: run densely)
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


def trace_to_features(model: nn.Module, module_names: list[str]) -> fx.GraphModule:
    """``model``'s graph with the outputs of ``module_names`` as its outputs, pruned of everything after them.

    Returns:
        a ``GraphModule`` holding only the submodules and attributes the pruned graph uses, under their own dotted
        names (so its state dict keys are the dense model's).
    """
    tracer = _BackboneTracer()
    try:
        graph = tracer.trace(model)
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
    for node in reversed(list(graph.nodes)):
        if node not in needed and node.op != "placeholder":
            graph.erase_node(node)
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


def _where(node: fx.Node) -> str:
    """The module path a node belongs to (its own target for a module call)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "<model forward>"


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return f"module {type(module).__module__}.{type(module).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"


def _lookup(node: fx.Node, root: nn.Module) -> tuple[SparseOp | None, Any]:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return module_op(module), module
    if node.op == "call_function":
        return FUNCTION_OPS.get(node.target), node.target
    return METHOD_OPS.get(node.target), node.target


def check_graph(graph: fx.Graph, root: nn.Module) -> None:
    """Mark every node that reads a sparse map with its op (``node.meta[RUN]``); refuse the first one without an op
    or whose settings have no exact sparse meaning, naming the op and its module path (a ``UsageError``)."""
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        node.meta[RUN] = None
        if node.op == "placeholder":
            kinds[node] = MAP
            continue
        if node.op in ("output", "get_attr"):
            kinds[node] = DENSE
            continue
        sparse_inputs = [kinds[n] for n in node.all_input_nodes if kinds[n] in (MAP, MAPS)]
        if not sparse_inputs:
            kinds[node] = DENSE
            continue
        if node.op == "call_function" and node.target is operator.getitem and kinds[node.args[0]] == MAPS:
            kinds[node] = MAP  # one part of a split: plain tuple indexing
            continue
        op, target = _lookup(node, root)
        where = f"{_describe(node, root)} at {_where(node)!r}"
        if op is None:
            raise UsageError(f"cannot run {where} on sparse maps: it has no sparse implementation. "
                             f"Supported: {supported_names()}")
        reason = op.check(target, node.args, node.kwargs) if op.check is not None else None
        if reason:
            raise UsageError(f"cannot run {where} on sparse maps: unsupported setting {reason}")
        node.meta[RUN] = op.run
        kinds[node] = op.returns


def last_uses(graph: fx.Graph) -> dict[str, list[str]]:
    """Node name -> names of the values no later node reads (freed right after it, as fx's Interpreter does)."""
    last: dict[str, str] = {}
    for node in graph.nodes:
        for source in node.all_input_nodes:
            last[source.name] = node.name
    freed: dict[str, list[str]] = {}
    for source, user in last.items():
        freed.setdefault(user, []).append(source)
    return freed


def run_graph(graph: fx.Graph, root: nn.Module, x: SparseMap, last_uses: dict[str, list[str]]) -> Any:
    """Evaluate a ``check_graph``-ed graph on ``x``, fetching modules and attributes from ``root`` by name."""
    env: dict[str, Any] = {}
    # One walk of the module tree per forward (not a path lookup per node): modules may have been swapped since
    # conversion (e.g. SyncBatchNorm), so they are never cached across forwards.
    modules = dict(root.named_modules())

    def value(node: fx.Node) -> Any:
        return env[node.name]

    for node in graph.nodes:
        if node.op == "placeholder":
            out = x
        elif node.op == "output":
            return fx.node.map_arg(node.args[0], value)
        else:
            args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
            run = node.meta[RUN]
            if node.op == "get_attr":
                module_path, _, name = node.target.rpartition(".")
                out = getattr(modules[module_path], name)
            elif node.op == "call_module":
                module = modules[node.target]
                out = module(*args, **kwargs) if run is None else run(module, *args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs) if run is None else run(node.target, *args, **kwargs)
            else:
                out = getattr(args[0], node.target)(*args[1:], **kwargs) if run is None else \
                    run(node.target, *args, **kwargs)
        env[node.name] = out
        for name in last_uses.get(node.name, ()):
            del env[name]
    raise RuntimeError("graph has no output node")
