"""The typed IR: types, graph, builder, verifier, text form, interpreter."""
from nncompile.ir.builder import GraphBuilder, prune
from nncompile.ir.graph import Attrs, Graph, Init, Input, Node, Param, TrainSpec
from nncompile.ir.init import materialize
from nncompile.ir.interp import run, run_all
from nncompile.ir.text import graphs_equal, parse_graph, print_graph
from nncompile.ir.types import Sparsity, TensorType
from nncompile.ir.verify import verify

__all__ = ["Attrs", "Graph", "GraphBuilder", "Init", "Input", "Node", "Param", "Sparsity", "TensorType",
           "TrainSpec", "graphs_equal", "materialize", "parse_graph", "print_graph", "prune", "run", "run_all",
           "verify"]
