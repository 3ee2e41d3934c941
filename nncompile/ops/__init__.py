"""The op table: one OpDef per op, one family per module. Importing this package registers them all."""
from nncompile.ops import (attention, conv, conv_grad, elementwise, embedding, fused, loss, matmul, norm, pool,  # noqa: F401
                           random, reduce, shape, train_ops)
from nncompile.ops.base import OPS, REQUIRED, Cost, OpDef, defop, get_op
from nncompile.ops import grads  # noqa: E402  (vjp rules, attached to the ops above)

grads.register()

__all__ = ["OPS", "REQUIRED", "Cost", "OpDef", "defop", "get_op"]
