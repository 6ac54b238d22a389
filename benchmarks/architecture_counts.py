"""The architecture issue's counts, measured on the code as it is (before and after a refactor).

Prints one line per count:

* ``daemon threads``: ``threading.Thread(..., daemon=True)`` a search can start, by module (local:
  progress, heartbeat, the threaded agent; Ray adds two);
* ``option reads``: attribute reads of ``SearchOptions`` (``opts.X``) per module outside
  ``attn_search/search/plan.py`` (which checks them once into the loop's plan), and
  ``record.get("options"...)`` reads across the package;
* ``pattern parameter places``: lines that name a pattern parameter as a string or a field, per
  file (what adding a parameter would touch);
* ``root modules``: modules at the package's root, beside its folders (the layers show in the
  folder tree when only the commands sit there);
* ``export lines``: lines of the Python export of one configuration;
* ``refill chain``: the layers of today's path from a freed population slot up to a strategy's
  ``ask`` whose functions still exist in the source (by name): the callback chain an event
  protocol replaces.

Usage::

    python benchmarks/architecture_counts.py
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "attn_search"
PATTERN_PARAMS = ("window", "dilation", "stride", "block_size", "n_global", "n_random")


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "agents" not in p.parts)


def daemon_threads() -> Counter[str]:
    found: Counter[str] = Counter()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            is_thread = isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Thread"
            if is_thread and any(k.arg == "daemon" for k in node.keywords):  # type: ignore[attr-defined]
                found[str(path.relative_to(ROOT))] += 1
    return found


def option_reads() -> tuple[Counter[str], int]:
    """Attribute reads of the search options (``opts.X``, ``self.opts.X``, ``plan.options.X``) per
    module, outside the module that checks them into the plan (``search/plan.py``; before it
    existed, every read counted)."""
    per_module: Counter[str] = Counter()
    for path in _sources():
        if path.name == "plan.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Store):
                continue
            inner = node.value
            name = getattr(inner, "id", None) if isinstance(inner, ast.Name) else getattr(inner, "attr", None)
            if name == "opts" or (name == "options" and isinstance(inner, ast.Attribute)
                                  and getattr(inner.value, "id", None) == "plan"):  # fmt: skip
                per_module[str(path.relative_to(ROOT))] += 1
    record_reads = sum(len(re.findall(r"""\.get\(["']options["']""", p.read_text())) for p in _sources())
    return per_module, record_reads


def pattern_parameter_places() -> Counter[str]:
    found: Counter[str] = Counter()
    names = "|".join(PATTERN_PARAMS)
    pattern = re.compile(rf"""["'](?:{names})["']|\.(?:{names})\b|\b(?:{names})\s*[:=]""")
    for path in _sources():
        for line in path.read_text().splitlines():
            if pattern.search(line) and not line.strip().startswith("#"):
                found[str(path.relative_to(ROOT))] += 1
    return found


def export_lines() -> int:
    from attn_search import AttentionConfig
    from attn_search.export import python_module

    text = python_module(AttentionConfig(pattern="window", window=32), vocab_size=16, n_classes=16, max_len=256)
    return len(text.splitlines())


def refill_chain() -> list[str]:
    """The functions on the path from a population's free slot to a strategy's ``ask``, in order
    (each found by name in the source)."""
    chain = ["_Population.run", "draw", "refill", "next_config", "LocalBackend.refill", "SearchLoop._ask_job", "ask"]
    text = "\n".join(p.read_text() for p in _sources())
    return [name for name in chain if re.search(rf"def {re.escape(name.split('.')[-1])}\b", text)]


def main() -> None:
    threads = daemon_threads()
    print(f"daemon threads: {sum(threads.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(threads.items()))})")
    per_function, record_reads = option_reads()
    print(
        f"option reads outside the plan: {sum(per_function.values())} in {len(per_function)} modules "
        f"({', '.join(f'{k} {v}' for k, v in per_function.most_common(4))}); "
        f'record.get("options") reads: {record_reads}'
    )
    places = pattern_parameter_places()
    print(
        f"pattern parameter places: {sum(places.values())} lines in {len(places)} files "
        f"({', '.join(f'{k}: {v}' for k, v in places.most_common())})"
    )
    root = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    print(f"root modules: {len(root)} ({', '.join(root)})")
    print(f"export lines: {export_lines()}")
    chain = refill_chain()
    print(f"refill chain: {len(chain)} layers still defined ({' -> '.join(chain)})")


if __name__ == "__main__":
    main()
