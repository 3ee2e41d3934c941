"""Code generation: emitters (cpp.py), their op rules (cpp_ops*.py), the build cache (build.py)."""

_registered = False


def register_rules() -> None:
    """Attach the C++ emit rules to the op table (once)."""
    global _registered
    if not _registered:
        from nncompile.codegen import cpp_ops, cpp_ops_grad, cpp_ops_nn, cpp_sparse

        cpp_ops.register()
        cpp_ops_nn.register()
        cpp_ops_grad.register()
        cpp_sparse.register()
        _registered = True
