"""The house rules of the import graph, read from the source (ast) without importing anything:

- every module of omni/ and every entry point stands on exactly one floor (FLOORS, the same table as
  docs/design.md), and imports only from its own floor or below: nothing imports upward;
- on floor 3 the models and the data code are siblings: neither imports the other;
- the import graph has no cycle;
- an `omni` import inside a function is one of the OPTIONAL ones, each marked `# optional: why`.
- every module of omni/ is imported by at least one test (docs/design.md, "Tests").
"""
import ast
import os
import re

import pytest

from conftest import ROOT

# floor -> module patterns (a trailing ".*" takes a package's modules, its __init__ included)
FLOORS = [
    ["omni.config", "omni.registry", "omni.cli", "omni.resume_policy", "omni.transcripts"],   # plain Python
    ["omni.checkpoint", "omni.runtime", "omni.tokenizer", "omni.logs", "omni.metrics"],     # files, devices, logs
    ["omni.layers", "omni.features"],                                       # building blocks
    ["omni.thinker", "omni.vision", "omni.audio_enc", "omni.codec", "omni.vocoder", "omni.talker",     # models
     "omni.omni_model",
     "omni.data.*"],                                                                        # | data
    ["omni.generation", "omni.speech_stream"],                                              # using models
    ["omni.loading", "omni.chat"],                                                          # files -> models
    ["omni.train.*"],                                                                       # the training core
    ["omni.stages.*"],                                                                      # the six stages
    ["omni.pipeline", "omni.export", "omni.export_llama", "omni.inspect", "omni.evaluate", "omni.plot",
     "omni.serve", "train_text", "train_audio_enc", "train_vision", "train_talker", "train_vocoder", "sft_omni",
     "infer"],                                                                              # tools, entry points
]
MODELS = {"omni.thinker", "omni.vision", "omni.audio_enc", "omni.codec", "omni.vocoder", "omni.talker",
          "omni.omni_model"}

# (importer, imported) pairs allowed inside a function: heavy or rarely needed imports
OPTIONAL = {
    ("omni.data.common", "omni.data.demo"),
    ("omni.data.demo", "omni.logs"),
    ("omni.data.prepare", "omni.data.audio"),
    ("omni.data.prepare", "omni.data.image"),
    ("omni.pipeline", "omni.plot"),
    ("omni.pipeline", "omni.data.demo"),
}


def module_files() -> dict[str, str]:
    """module name -> file, for omni/ and the entry points at the repository root."""
    found = {}
    for top, _, names in os.walk(os.path.join(ROOT, "omni")):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(top, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(top, name)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            found[name[:-3]] = os.path.join(ROOT, name)
    return found


MODULES = module_files()


def floor_of(module: str) -> int | None:
    for floor, patterns in enumerate(FLOORS):
        for p in patterns:
            if module == p or (p.endswith(".*") and (module == p[:-2] or module.startswith(p[:-1]))):
                return floor
    return None


def imports_of(path: str):
    """(imported omni module, line number, inside a function?) of every import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from omni import checkpoint` imports the module omni.checkpoint
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "omni" and target != "omni":
                yield target, node.lineno, id(node) in inside


GRAPH = {m: sorted({t for t, _, _ in imports_of(path)}) for m, path in MODULES.items()}


def test_every_module_stands_on_one_floor():
    assert [m for m in MODULES if m != "omni" and floor_of(m) is None] == []
    placed = [p for floor in FLOORS for p in floor]
    assert len(placed) == len(set(placed))


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
              for m, targets in GRAPH.items() for t in targets if m != "omni" and floor_of(t) > floor_of(m)]
    assert upward == []


def test_models_and_data_code_do_not_import_each_other():
    def is_data(m):
        return m == "omni.data" or m.startswith("omni.data.")
    crossing = [(m, t) for m, targets in GRAPH.items() for t in targets
                if (m in MODELS and is_data(t)) or (is_data(m) and t in MODELS)]
    assert crossing == []


def test_the_import_graph_has_no_cycle():
    done, path = set(), []

    def visit(m):
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in GRAPH.get(m, []):
            visit(t)
        path.pop()
        done.add(m)
    for m in GRAPH:
        visit(m)


def test_in_function_imports_are_the_listed_optional_ones_and_say_why():
    found = set()
    for m, path in MODULES.items():
        lines = open(path, encoding="utf-8").read().splitlines()
        for target, lineno, in_function in imports_of(path):
            if in_function:
                found.add((m, target))
                assert re.search(r"#\s*optional:\s*\S", lines[lineno - 1]), \
                    f"{path}:{lineno}: an in-function import of {target} needs '# optional: why'"
    assert found <= OPTIONAL, f"unlisted in-function imports: {sorted(found - OPTIONAL)}"
    assert OPTIONAL <= found, f"listed but gone (drop them from OPTIONAL): {sorted(OPTIONAL - found)}"


def test_the_design_doc_shows_the_same_floors():
    doc = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    for patterns in FLOORS:
        for p in patterns:
            name = p[:-2].replace(".", "/") + "/" if p.endswith(".*") else p.replace(".", "/") + ".py"
            assert name in doc, f"docs/design.md does not place {name} on a floor"


def test_every_module_of_omni_is_imported_by_a_test():
    """Imported by name (`import omni.x`, `from omni.x import y`, `from omni import x`), or as the
    package of a module so imported."""
    imported = set()
    for top, _, names in os.walk(os.path.join(ROOT, "tests")):
        for name in names:
            if name.endswith(".py"):
                for node in ast.walk(ast.parse(open(os.path.join(top, name), encoding="utf-8").read())):
                    if isinstance(node, ast.Import):
                        imported.update(a.name for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        imported.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
    covered = {".".join(name.split(".")[:i]) for name in imported for i in range(1, name.count(".") + 2)}
    missing = sorted(m for m in MODULES if m.startswith("omni") and m not in covered)
    assert not missing, f"imported by no test (import it where its behaviour is tested): {missing}"
