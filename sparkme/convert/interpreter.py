"""Check a traced backbone's graph against the op table once, at conversion, and run it on sparse maps.

``check_graph`` follows which values are sparse maps from the input onwards and stores, on every node that reads
one, the op table's ``run`` (``node.meta[RUN]``); a node without an entry, or whose settings have no exact sparse
meaning, is refused there with its module path. ``SparseInterpreter`` is ``torch.fx``'s own interpreter (its value
store frees each value after its last use) with those nodes sent to their ``run``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from torch import nn

from sparkme.convert.op_table import DENSE, FUNCTION_OPS, MAP, MAPS, METHOD_OPS, SparseOp, module_op, supported_names
from sparkme.errors import UsageError
from sparkme.sparse.base import SparseMap

RUN = "sparkme_run"  # node.meta key: the SparseOp.run of a node that reads a sparse map (None: run densely)


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


class SparseInterpreter(fx.Interpreter):
    """Evaluates a ``check_graph``-ed graph, fetching modules and attributes from ``root`` by name.

    Made per forward: modules may have been swapped since conversion (e.g. for ``SyncBatchNorm``), so none is
    cached across forwards.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.extra_traceback = False  # errors keep their own type and message

    def run_node(self, node: fx.Node) -> Any:
        run = node.meta.get(RUN)
        if run is None:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        # ``submodules`` is the module tree walked once by this forward's interpreter: a path lookup per node
        # (``fetch_attr``) costs ~10 us each, 2 ms a ResNet-50 forward.
        target = self.submodules[node.target] if node.op == "call_module" else node.target
        return run(target, *args, **kwargs)


def run_graph(graph: fx.Graph, root: nn.Module, x: SparseMap) -> Any:
    """The outputs of a ``check_graph``-ed graph (one input) for the sparse map ``x``."""
    return SparseInterpreter(root, graph).run(x, enable_io_processing=False)
