"""The native module's `.pyi` stub and the module agree, and the public API is documented."""

import ast
import pathlib

import cairn
from cairn import _cairn

STUB = pathlib.Path(cairn.__file__).with_name("_cairn.pyi")


def stub_names():
    tree = ast.parse(STUB.read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            names[node.target.id] = node
    return names


def test_stub_and_native_module_declare_the_same_names():
    declared = {n for n in stub_names() if n not in ("TensorLeaf", "ValueLeaf", "Loaded", "Options")}
    public = {n for n in dir(_cairn) if not n.startswith("_") or n == "__version__"}
    assert declared == public


def test_stubbed_manager_methods_exist():
    manager = stub_names()["Manager"]
    methods = {n.name for n in manager.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"}
    assert methods == {n for n in dir(_cairn.Manager) if not n.startswith("_")}


def test_every_public_name_has_a_docstring():
    for name in cairn.__all__:
        obj = getattr(cairn, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), name
