"""Conversion of a dense timm / torchvision backbone into a graph that runs on sparse maps.

- ``feature_levels``: the four modules whose outputs SparK's decoder reads (strides 4, 8, 16, 32);
- ``trace_to_features``: the model's ``torch.fx`` graph up to them;
- ``op_table``: what each module, function and method does to a sparse map (``pointwise.is_pointwise`` says which
  modules act per site; ``convnext_leaf`` runs ConvNeXt's block as one op);
- ``check_graph`` / ``run_graph``: the graph checked against the table at conversion, then interpreted per forward.
"""

from sparkme.convert.feature_levels import feature_levels
from sparkme.convert.interpreter import SparseInterpreter, check_graph, run_graph
from sparkme.convert.pointwise import is_pointwise
from sparkme.convert.trace import trace_to_features

__all__ = ["SparseInterpreter", "check_graph", "feature_levels", "is_pointwise", "run_graph", "trace_to_features"]
