"""Import hygiene and the layout's one-way imports.

In a fresh interpreter: importing llama_port and llama_port.checkpoints pulls in torch only, none
of the optional packages (safetensors, huggingface_hub, accelerate, transformers, gguf); importing
the model loads no checkpoint code. Over the source: the package's import-time graph has no cycle,
and every import goes down the layers the README's Layout section lists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llama_port

PACKAGE = Path(llama_port.__file__).parent
# The README's layers, lowest first: a module imports (at import time) only from its own layer or
# the ones below it. Within a layer the acyclicity test keeps imports one-way.
LAYERS = [
    ["llama_port.dtypes", "llama_port.activations", "llama_port.rope", "llama_port.outputs"],
    ["llama_port.configuration"],
    ["llama_port.cache", "llama_port.attention", "llama_port.quantization"],
    ["llama_port.generation"],
    ["llama_port.pretrained"],
    ["llama_port.modeling"],
    ["llama_port"],  # the public API (__init__.py)
    ["llama_port.distributed"],
    ["llama_port.checkpoints"],
    ["llama_port.parity"],
    ["llama_port.cli", "llama_port.__main__"],
]


def test_importing_llama_port_needs_torch_only():
    code = (
        "import sys, llama_port, llama_port.checkpoints;"
        "optional = ('safetensors', 'huggingface_hub', 'accelerate', 'transformers', 'gguf');"
        "bad = [m for m in optional if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(llama_port.__file__).parent.parent)


def test_model_code_imports_torch_only():
    """llama_port's model, config and attention modules never import transformers."""
    import subprocess
    import sys

    code = (
        "import sys; import llama_port, llama_port.modeling, llama_port.attention, llama_port.rope;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_model_loads_no_checkpoint_code():
    """The model knows nothing of files: checkpoints/ depends on modeling.py, never the reverse."""
    code = (
        "import sys, llama_port.modeling;"
        "bad = [m for m in sys.modules if m.startswith('llama_port.checkpoints') or m.split('.')[0] in"
        " ('huggingface_hub', 'safetensors', 'transformers', 'accelerate', 'gguf')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_nodes(tree: ast.Module):
    """Import statements run when the module is imported: top level and inside top-level if /
    try blocks, but not in functions or classes (deferred) nor under ``if TYPE_CHECKING``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body])


def import_graph() -> dict[str, set[str]]:
    """{module: the llama_port modules it imports at import time}, from the source."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _import_time_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # "from pkg import sub" imports the submodule; "from mod import name" the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer if prefix != "llama_port"):
            return index
    assert module == "llama_port", f"{module} is in no layer of LAYERS: add it (and to the README's Layout)"
    return LAYERS.index(["llama_port"])


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["llama_port.modeling"] >= {"llama_port.attention", "llama_port.rope"}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_go_down_the_layers():
    upward = [
        f"{module} (layer {_layer_of(module)}) imports {target} (layer {_layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if _layer_of(target) > _layer_of(module)
    ]
    print("\n".join(upward))
    assert not upward
