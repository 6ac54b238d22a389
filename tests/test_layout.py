"""The package's layers, checked from its source: imports point one way, and none form a cycle.

``python tests/test_layout.py`` (or ``make imports``) prints every module with its layer and the
project modules it imports, lazy imports inside functions included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS: dict[str, int] = {
    "attn_search.engine": 0,  # what is scored
    "attn_search.errors": 1,
    "attn_search.search.pareto": 1,
    "attn_search.search.space": 1,
    "attn_search.search.pruning": 1,
    "attn_search.search.failures": 1,
    "attn_search.search.rundir": 1,
    "attn_search.search.evaluators": 1,
    "attn_search.envs": 1,
    "attn_search.report.outputs": 1,  # the loop's listeners
    "attn_search.report.progress": 1,
    "attn_search.strategies": 2,  # how the next configuration is chosen
    "attn_search.backends": 2,  # where a trial runs
    "attn_search.search.loop": 3,  # the one loop
    "attn_search.search.plan": 3,  # the options checked once into the loop's plan
    "attn_search.replay": 3,  # strategies replayed on recorded tables (the benchmark's fast path)
    "attn_search.confirm": 2,  # a finished run's front retrained (seeds, scale)
    "attn_search.report.attention_map": 2,  # the chosen configuration retrained, its attention drawn
    "attn_search.export": 4,
    "attn_search.record": 4,
    "attn_search.cli": 5,
    # the folders' own __init__ (after their modules: the first matching prefix wins); they import nothing
    "attn_search.search": 1,
    "attn_search.report": 1,
}
COMMANDS = {"cli", "confirm", "errors", "export", "record", "replay"}
"""The modules at the package's root: the commands on top of the loop (and the one error type they share)."""
SIBLINGS = {"attn_search.strategies", "attn_search.backends"}
"""Neither imports the other: strategies do not know where trials run, backends not who proposed."""


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "attn_search").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "envs").rglob("*.py")):
        stem = path.relative_to(ROOT / "envs").with_suffix("").parts
        out[".".join(("attn_search", "envs", *(stem[:-1] if stem[-1] == "__init__" else stem)))] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its source (module level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # `from pkg import submodule` imports the submodule; `from pkg import name`, the package
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def layer(name: str) -> tuple[str, int] | None:
    for prefix, rank in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return prefix, rank
    return None


def test_the_folders_show_the_layers() -> None:
    root = {p.stem for p in (ROOT / "attn_search").glob("*.py")} - {"__init__"}
    assert root == COMMANDS, f"modules at the root that belong in a layer's folder: {sorted(root - COMMANDS)}"
    folders = {p.name for p in (ROOT / "attn_search").iterdir() if (p / "__init__.py").is_file()}
    assert {"engine", "search", "report", "strategies", "backends"} <= folders


def test_a_strategy_can_use_the_space_without_loading_the_loop() -> None:
    import subprocess

    code = "import sys, attn_search.search.space; print('attn_search.search.loop' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_every_module_has_a_layer() -> None:
    missing = [m for m in graph() if m != "attn_search" and layer(m) is None]
    assert not missing, f"modules without a layer in tests/test_layout.py: {missing}"


def test_imports_point_down_and_siblings_stay_apart() -> None:
    bad = []
    for module, targets in graph().items():
        here = layer(module)
        if here is None:  # the package's __init__: the public API re-exports
            continue
        for target in targets:
            there = layer(target)
            if there is None or there[0] == here[0]:
                continue
            if there[1] > here[1] or {here[0], there[0]} == SIBLINGS:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layers: " + ", ".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    g.pop("attn_search", None)  # importing a submodule runs the package's __init__; it imports down only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


if __name__ == "__main__":  # pragma: no cover
    for module, targets in sorted(graph().items(), key=lambda kv: ((layer(kv[0]) or ("", -1))[1], kv[0])):
        rank = layer(module)
        print(f"[{rank[1] if rank else '-'}] {module}")
        for target in sorted(targets):
            print(f"      -> {target}")
    sys.exit(0)
