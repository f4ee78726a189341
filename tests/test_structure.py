"""The package's structure stays as CONTRIBUTING.md describes it: the layers of the import graph (no
cycle, no import from a lower layer up into a higher one) and, for every op, every part of the
"adding an op" path. Reads the source (ast); imports only what it checks."""

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vit_kernels"

# CONTRIBUTING.md's layers, lowest first: a module's layer is that of its longest matching prefix.
LAYERS = [
    ("vit_kernels.dtypes", "vit_kernels.arch", "vit_kernels.testing", "vit_kernels.reference", "vit_kernels.tables"),
    ("vit_kernels.checks", "vit_kernels.replay"),
    ("vit_kernels.triton", "vit_kernels.cuda"),
    ("vit_kernels.backends", "vit_kernels.tuning"),
    ("vit_kernels.ops", "vit_kernels.library", "vit_kernels.autograd"),
    ("vit_kernels.nn", "vit_kernels.models", "vit_kernels.hf_attention"),
    ("vit_kernels.swap",),
    ("vit_kernels.verify", "vit_kernels.analysis", "vit_kernels.bench", "vit_kernels.training"),
    ("vit_kernels.commands", "vit_kernels.cli", "vit_kernels.__main__", "vit_kernels"),
]
# Upward imports that stay inside a function (run at call time, never at import), each with its reason.
# A new one is a design decision: add it here with the reason, or move the code down.
LAZY_UPWARD = {
    ("vit_kernels.triton.aot", "vit_kernels.backends"): "interpreter_enabled() lives with the dispatch",
    ("vit_kernels.triton.attention_stats", "vit_kernels.ops.attention_stats"): "the AttentionStats result type",
    ("vit_kernels.cuda.attention_stats", "vit_kernels.ops.attention_stats"): "the AttentionStats result type",
    ("vit_kernels.tuning", "vit_kernels.nn"): "tune(model) walks the fused modules",
    ("vit_kernels.tuning", "vit_kernels.swap.wrapper"): "tune(model) walks the swap wrappers",
    ("vit_kernels.tuning", "vit_kernels"): "the package version in the tuning cache key",
    ("vit_kernels.bench.report", "vit_kernels"): "the package version in the report",
    ("vit_kernels.verify", "vit_kernels"): "vk.fuse for verify(model) without a fused copy",
    ("vit_kernels.cuda", "vit_kernels"): "the prebuilt extension vit_kernels._C (not a Python module)",
}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module}: in no layer of CONTRIBUTING.md (add it to LAYERS here and there)"
    return layer


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """({module: modules imported at import time}, {module: modules imported inside functions})."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    top, lazy = defaultdict(set), defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        at_top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                elif (node.module or "").startswith("vit_kernels"):
                    base = node.module
                else:
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("vit_kernels")]
            else:
                continue
            for t in targets:
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    (top if id(node) in at_top else lazy)[name].add(t)
    return modules, top, lazy


def test_every_module_is_in_a_layer():
    modules, _, _ = import_graph()
    for m in modules:
        layer_of(m)


def test_no_module_imports_a_higher_layer():
    _, top, lazy = import_graph()
    up_top = [(a, b) for a, bs in top.items() for b in bs if layer_of(b) > layer_of(a)]
    assert not up_top, f"import-time imports from a lower layer up into a higher one: {sorted(up_top)}"
    up_lazy = {(a, b) for a, bs in lazy.items() for b in bs - top[a] if layer_of(b) > layer_of(a)}
    assert up_lazy <= set(LAZY_UPWARD), f"new upward imports (see LAZY_UPWARD): {sorted(up_lazy - set(LAZY_UPWARD))}"


def test_import_graph_has_no_cycle():
    _, top, _ = import_graph()
    # a package's __init__ importing its own submodules is how Python packages work: not a cycle
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in top.items()}
    state, path = {}, []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(n) :] + [n])}")
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_layer_checks_can_fail():
    assert layer_of("vit_kernels.arch") < layer_of("vit_kernels.triton.gemm") < layer_of("vit_kernels.ops.linear")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


# ------------------------------------------------------------------------------- adding an op
def ops():
    from vit_kernels import ops as ops_pkg

    return [n for n in ops_pkg.__all__ if callable(getattr(ops_pkg, n)) and not isinstance(getattr(ops_pkg, n), type)]


def op_source(op: str) -> str:
    module = getattr(importlib.import_module("vit_kernels.ops"), op).__module__
    return (ROOT / (module.replace(".", "/") + ".py")).read_text()


@pytest.mark.parametrize("op", ops())
def test_every_op_has_every_part(op):
    """CONTRIBUTING.md's "adding an op", for each op of vit_kernels.ops: an oracle, a Triton launcher in a
    module inspect lists, an existing CUDA wrapper, a caller among the modules (nn.py, swap/, hf_attention.py),
    the layout and hard-input tests."""
    from vit_kernels import reference
    from vit_kernels.commands.inspect import TRITON_MODULES
    from vit_kernels.cuda import ops as cuda_ops

    src = op_source(op)
    assert callable(getattr(reference, op, None)), f"{op}: no oracle vit_kernels.reference.{op}"
    triton_modules = set(re.findall(r"from \.\.triton import (\w+)", src))
    triton_modules |= set(re.findall(r"from \.\.triton\.(\w+) import", src))
    assert triton_modules, f"{op}: its op module imports no Triton module"
    missing = sorted(triton_modules - set(TRITON_MODULES))
    assert not missing, f"{op}: Triton modules {missing} are not in inspect's TRITON_MODULES"
    for m in triton_modules:
        assert hasattr(importlib.import_module(f"vit_kernels.triton.{m}"), "aot_specs"), f"{m}: no aot_specs()"
    for fn in re.findall(r"cuda_ops\.(\w+)\(", src):
        assert callable(getattr(cuda_ops, fn, None)), f"{op}: vit_kernels.cuda.ops.{fn} does not exist"
    users = [PKG / "nn.py", PKG / "hf_attention.py", *sorted((PKG / "swap").glob("*.py"))]
    assert any(re.search(rf"\b{op}\(", u.read_text()) for u in users), (
        f"{op}: no drop-in module (nn.py), swap adapter (swap/) or attention entry (hf_attention.py) calls it"
    )
    from layouts import SPECS

    assert op in SPECS, f"{op}: no tensor arguments in tests/layouts.py SPECS"
    assert f'"{op}"' in (ROOT / "tests" / "test_hard_inputs.py").read_text(), f"{op}: not in test_hard_inputs OPS"
    from vit_kernels import library

    for table in ("SCHEMAS", "SHAPES", "TORCH_PATHS", "IMPLS", "BACKWARDS", "FLOPS"):
        assert op in getattr(library, table), f"{op}: not in vit_kernels.library.{table} (the custom op)"
    assert hasattr(getattr(torch.ops, library.NAMESPACE), op), (
        f"{op}: torch.ops.{library.NAMESPACE}.{op} is not registered"
    )


def test_contributing_names_only_existing_files():
    """Every repository path CONTRIBUTING.md names in backquotes exists (placeholders like <op> aside)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    paths = {p for p in re.findall(r"`((?:vit_kernels|csrc|tests|benchmarks)/[\w/.]+)`", text)}
    assert paths, "CONTRIBUTING.md names no files"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"CONTRIBUTING.md names files that do not exist: {missing}"
