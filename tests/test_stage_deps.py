"""dvc.yaml tells the truth: each stage depends on exactly the project code its script runs."""
import ast
import copy
from pathlib import Path

import yaml

from conftest import REPO


def project_imports(path):
    """The src modules a file imports anywhere in it (top level or inside a function), as names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "src" or a.name.startswith("src.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "src" or node.module.startswith("src."):
                found.add(node.module)
                # from src.core import process: the module src.core.process
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if module_file(f"{node.module}.{a.name}").is_file()}
    return found


def module_file(name):
    parts = name.split(".")
    candidate = REPO.joinpath(*parts).with_suffix(".py")
    return candidate if candidate.is_file() else REPO.joinpath(*parts, "__init__.py")


def import_closure(module):
    """Every project file that running `python -m <module>` executes: the module, what it imports,
    directly or not, and the __init__.py of every package on the way."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        # Importing src.data.images runs src/__init__.py and src/data/__init__.py first.
        parts = name.split(".")
        for path in [module_file(".".join(parts[:i])) for i in range(1, len(parts))] + [module_file(name)]:
            if path not in seen:
                seen.add(path)
                todo += sorted(project_imports(path))
    return {p.relative_to(REPO).as_posix() for p in seen}


def code_deps_mismatch(dvc_yaml):
    """{stage: (missing from dvc.yaml, listed but never run)} for every stage whose code deps are off."""
    wrong = {}
    for name, stage in dvc_yaml["stages"].items():
        words = stage["cmd"].split()
        module = words[words.index("-m") + 1]
        declared = set()
        for dep in stage.get("deps", []):
            if dep.startswith("src/"):  # a folder stands for every .py file in it
                declared |= ({p.relative_to(REPO).as_posix() for p in (REPO / dep).rglob("*.py")}
                             if dep.endswith("/") else {dep})
        needed = import_closure(module)
        if declared != needed:
            wrong[name] = (sorted(needed - declared), sorted(declared - needed))
    return wrong


def dvc_yaml():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    assert code_deps_mismatch(dvc_yaml()) == {}


def test_a_module_missing_from_a_stage_or_listed_in_vain_is_caught():
    for stage, dep, extra in (("ingest", "src/data/archives.py", None), ("classes", "src/data/manifest.py", None),
                              ("ingest", None, "src/train.py")):
        broken = copy.deepcopy(dvc_yaml())
        deps = broken["stages"][stage]["deps"]
        if dep:
            deps.remove(dep)
        if extra:
            deps.append(extra)
        assert code_deps_mismatch(broken) == {stage: ([dep] if dep else [], [extra] if extra else [])}


def test_a_folder_dep_stands_for_every_module_in_it():
    broken = copy.deepcopy(dvc_yaml())
    broken["stages"]["classes"]["deps"].append("src/training/")  # classes runs none of it
    missing, in_vain = code_deps_mismatch(broken)["classes"]
    assert missing == [] and "src/training/trainer.py" in in_vain
    assert any(dep.endswith("/") for dep in dvc_yaml()["stages"]["train"]["deps"])  # and dvc.yaml uses it


def test_imports_inside_functions_count():
    # predict imports the figures inside draw_picture: the predict stage can run it.
    assert "src.inference.figures" in project_imports(Path(REPO / "src/predict.py"))
    assert "src/inference/figures.py" in import_closure("src.predict")
