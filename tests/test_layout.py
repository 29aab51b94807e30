"""The folder tree is the data path: a module imports only its own stage or earlier ones.

Stage order (docs/architecture.md): streams, formats, plan, read, decode, batch, stats,
options, loader_state, loader.  Checked on the source with ``ast`` (lazy imports inside functions count).
"""
import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
ORDER = ["streams", "formats", "plan", "read", "decode", "batch", "stats", "options", "loader_state", "loader"]


def _stage(module: str) -> str | None:
    """'pipeline.read.table' -> 'read'; the package itself (lazy exports) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" else None


def _imports(path: Path) -> list[str]:
    pkg = "pipeline." + ".".join(path.relative_to(PIPELINE).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0] + ".__init__"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None and node.level:  # "from . import x": x is the module
                out += [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(mod)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m == "pipeline" or m.startswith("pipeline.")]


def test_imports_point_down_the_data_path():
    bad = []
    modules = sorted(PIPELINE.rglob("*.py"))
    assert len(modules) > 20
    for path in modules:
        here = _stage("pipeline." + ".".join(path.relative_to(PIPELINE).with_suffix("").parts))
        if here == "__init__":  # pipeline/__init__.py: lazy exports of every stage
            continue
        assert here in ORDER, f"{path} is in no stage of {ORDER}"
        for m in _imports(path):
            there = _stage(m)
            if there is None or there == "__init__":
                bad.append(f"{path.relative_to(PIPELINE)} imports the top-level package")
            elif ORDER.index(there) > ORDER.index(here):
                bad.append(f"{path.relative_to(PIPELINE)} ({here}) imports {m} ({there})")
    assert not bad, "imports from a later stage:\n" + "\n".join(bad)
