"""The layout rules the code relies on, checked on the source (issue 9): each host-specific import stays in its
package, the memory planner stays pure, and every place that opens a pipeline or builds a request goes through
the one entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ("cascade", "cascade_backends")


def imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in a file (absolute imports only; relative ones stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def relative_imports(path: Path) -> set[str]:
    return {node.module or "" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
            and node.level > 0}


def sources(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


@pytest.mark.parametrize("forbidden,allowed_in", [
    (("modules", "gradio"), "extension"),  # SD.Next's packages
    (("uvicorn", "ray", "prometheus_client"), "serving"),
])
def test_host_imports_stay_in_their_package(forbidden, allowed_in):
    offenders = []
    for path in sources(*ENGINE, "extension", "serving"):
        if path.relative_to(ROOT).parts[0] == allowed_in:
            continue
        bad = {m for m in imports(path) if m.split(".")[0] in forbidden}
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in sorted(bad)]
    assert offenders == []


def test_engine_imports_no_web_stack():
    """The engine and device layer never import a web framework (the extension may: SD.Next's app is FastAPI)."""
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sources(*ENGINE) for m in imports(p)
                 if m.split(".")[0] in ("fastapi", "starlette", "uvicorn", "ray", "prometheus_client")]
    assert offenders == []


def test_engine_does_not_import_its_hosts():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sources(*ENGINE) for m in imports(p)
                 if m.split(".")[0] in ("extension", "scripts")]
    assert offenders == []


def test_backends_know_nothing_of_the_engine():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sources("cascade_backends") for m in imports(p)
                 if m.split(".")[0] == "cascade"]
    assert offenders == []


def test_memory_planner_is_pure():
    """No loader, executor, session or argparse in the planner: it turns sizes and a budget into a plan."""
    planner = ROOT / "cascade" / "memory.py"
    assert not relative_imports(planner) & {"loader", "offload", "engine", "session", "pipeline", "run", "cli"}
    assert "argparse" not in imports(planner)


def test_one_way_to_open_a_pipeline_and_build_a_request():
    """Only cascade.session assembles a pipeline from files, and no host constructs GenerationRequest by hand (the
    engine's own modules may: they define it, and sessions plan for a default one)."""
    hand_built = []
    for path in sources("cascade", "extension", "serving"):
        rel = path.relative_to(ROOT)
        text = path.read_text()
        if "load_components(" in text and rel.name not in ("engine.py", "session.py"):
            hand_built.append(f"{rel}: load_components")
        if rel.parts[0] != "cascade" and "GenerationRequest(" in text:
            hand_built.append(f"{rel}: GenerationRequest(...)")
    assert hand_built == []
