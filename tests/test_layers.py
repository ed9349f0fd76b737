"""The package's layers: folders, and which folder may import which.

Layers, lowest first, each a folder of emailrelay/: util, runtime, config,
store, auth, policy, net, server, forward. A module imports from its own
folder or lower ones, never higher; `main` (the wiring) and `tools` sit on
top. docs/internals.md describes the same order. Imports inside functions
are for laziness only, and each says why in a comment just above it. No
module imports itself through others (no import cycle, in or across folders).
"""

import ast
import os

from helpers import ROOT

LAYERS = ["util", "runtime", "config", "store", "auth", "policy", "net", "server", "forward"]
WIRING = ["emailrelay.__init__", "emailrelay.__main__", "emailrelay.main", "emailrelay.build",
          "emailrelay.modes"]
PACKAGE = os.path.join(ROOT, "emailrelay")


def modules():
    """(folder or None for the top, dotted name, path) of every module in the package."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, PACKAGE)
        for name in files:
            if name.endswith(".py"):
                parts = [] if rel == "." else rel.split(os.sep)
                dotted = ".".join(["emailrelay"] + parts + [name[:-3]])
                found.append((parts[0] if parts else None, dotted, os.path.join(folder, name)))
    return found


def imports(dotted, path):
    """(line, absolute module name) of every import of a package module in `path`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = dotted.split(".")[:-1] if not path.endswith("__init__.py") else dotted.split(".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("emailrelay"):
                continue
            if node.module is None or target.count(".") < 2:
                out += [(node.lineno, target + "." + a.name) for a in node.names]
            else:
                out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("emailrelay")]
    return out


def folder_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_every_module_but_the_wiring_lives_in_a_layer_folder():
    loose = [dotted for folder, dotted, _ in modules()
             if folder is None and dotted not in WIRING]
    folders = {folder for folder, _, _ in modules() if folder}
    assert loose == []
    assert folders == set(LAYERS) | {"tools"}


def test_no_layer_imports_a_higher_one():
    upward = []
    for folder, dotted, path in modules():
        if folder not in LAYERS:
            continue
        for line, target in imports(dotted, path):
            other = folder_of(target)
            if other is None and target != "emailrelay.__version__":
                upward.append("%s:%d imports %s (above every layer)" % (dotted, line, target))
            elif other is not None and LAYERS.index(other) > LAYERS.index(folder):
                upward.append("%s:%d imports %s" % (dotted, line, target))
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    path = tmp_path / "spool.py"
    path.write_text("from ..server import smtp_server\nfrom . import envelope\n")
    found = imports("emailrelay.store.spool", str(path))
    assert found == [(1, "emailrelay.server.smtp_server"), (2, "emailrelay.store.envelope")]
    assert LAYERS.index(folder_of(found[0][1])) > LAYERS.index("store")


def function_imports(path):
    """(line, the line above) of every import inside a function of `path`."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    tree = ast.parse(text)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found.append((inner.lineno, lines[inner.lineno - 2].strip()))
    return sorted(set(found))


def test_imports_inside_functions_say_why():
    unexplained = []
    for _, dotted, path in modules():
        for line, above in function_imports(path):
            if not above.startswith(("#", "import ", "try:")):
                unexplained.append("%s:%d" % (dotted, line))
    assert unexplained == []


def test_the_import_check_sees_an_unexplained_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    x = 1\n    import ssl\n\n\ndef g():\n"
                    "    # Why: only g needs it.\n    import ctypes\n")
    assert function_imports(str(path)) == [(3, "x = 1"), (8, "# Why: only g needs it.")]


def cycles(graph):
    """The import cycles of `graph` (module -> modules it imports), each a sorted list."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(sorted(path[path.index(target):]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_itself_through_others():
    names = {dotted for _, dotted, _ in modules()}
    graph = {dotted: {t for _, t in imports(dotted, path) if t in names and t != dotted}
             for _, dotted, path in modules()}
    assert cycles(graph) == []


def test_the_cycle_check_sees_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
