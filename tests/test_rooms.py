"""The layout holds: rooms import only rooms below them, the contract stays plain, the client stays light.

Read from the code (every `import` of every module, at any depth, `TYPE_CHECKING` blocks aside) rather
than from a picture, so a new import that goes upward or closes a cycle fails here, naming the modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own room and any room listed before it, never one after it.
ROOMS = [
    "workers.contract",
    "workers.storage",
    "workers.bases",
    "workers.engine",
    "workers.evaluation",
    "workers.training",
    "workers.sessions",
    "workers.serving",
    "orchestrator.settings",
    "orchestrator.spec",
    "orchestrator.scheduling",
    "orchestrator.store",
    "orchestrator.lineage",
    "orchestrator.tracking",
    "orchestrator.registry",
    "orchestrator.control",
    "orchestrator.service",
    "orchestrator.server",
    "orchestrator.client",
    "orchestrator.cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    matches = [room for room in ROOMS if module == room or module.startswith(room + ".")]
    return max(matches, key=len) if matches else None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports (run-time imports: `if TYPE_CHECKING:` blocks are skipped)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from package import module` needs the module; `from module import name`, the module.
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in known else child.module)
            visit(child)

    visit(tree)
    return found


def our_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in ("orchestrator", "workers")
        for path in (ROOT / package).rglob("*.py")
    }


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in imports_of(path, set(modules)):
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def test_every_module_lives_in_a_room() -> None:
    homeless = [m for m in our_modules() if m not in ("orchestrator", "workers") and room_of(m) is None]
    homeless = [m for m in homeless if not m.startswith("workers.assets")]
    assert not homeless, f"modules outside every room (add them to a room): {homeless}"


def test_no_room_imports_a_room_above_it() -> None:
    upward = []
    for source, targets in graph().items():
        source_room = room_of(source)
        if source_room is None:
            continue
        for target in targets:
            target_room = room_of(target)
            if target_room is not None and ROOMS.index(target_room) > ROOMS.index(source_room):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports that go upward:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                walk(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(our_modules()):
        if node not in state:
            walk(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_contract_is_plain_data() -> None:
    """The control plane decides over the contract: it must not cost torch, transformers or pyarrow."""
    loaded = _loaded_after("import workers.contract.plan, workers.contract.memory, workers.contract.sessions")
    assert not loaded & {"torch", "transformers", "pyarrow", "ray", "mlflow"}


def test_the_client_is_light() -> None:
    """`from orchestrator import Client` on a laptop: no torch, no pyarrow, no Ray, no MLflow, no SQL."""
    loaded = _loaded_after("from orchestrator import Client, JobSpec\nClient, JobSpec")
    assert not loaded & {"torch", "transformers", "pyarrow", "ray", "mlflow", "sqlalchemy"}
