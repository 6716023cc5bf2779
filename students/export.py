"""Export a one-step pipeline as a diffusers "fully custom" pipeline folder that loads without this project.

diffusers resolves an exported folder like this (``pipelines/pipeline_loading_utils.py``): a list-valued
``_class_name`` ``[module, class]`` in ``model_index.json`` whose ``module.py`` lies in the folder is the
pipeline class, and a component entry ``[module, class]`` whose ``<component>/module.py`` exists is a
custom component; both are imported with ``get_class_from_dynamic_module`` under
``trust_remote_code=True``. Those files are copied alone into diffusers' module cache (plus files they
import relatively from the same folder), so each must be self-contained: the pipeline module and each
student's module are written here with the package modules they import inlined, in dependency order.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path

PIPELINE_MODULE = "pipeline_one_step_gan"
# Component libraries diffusers loads from its own registry; anything else is this project's code.
STOCK_LIBRARIES = ("diffusers", "transformers")


def is_one_step_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved ``OneStepGANPipeline`` (plain or exported: ``_class_name`` a name or ``[module,
    name]``)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    name = json.loads(index.read_text()).get("_class_name")
    return (name[-1] if isinstance(name, list) and name else name) == "OneStepGANPipeline"


def _source(module: str) -> tuple[str, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"cannot export module {module}: it has no Python source file")
    return Path(spec.origin).read_text(), spec.origin


def _internal_imports(tree: ast.Module, module: str, root: str) -> list[tuple[ast.ImportFrom, str]]:
    """Top-level ``from X import ...`` statements that import this package's own modules, with X resolved."""
    package = module.rpartition(".")[0]
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if not node.module:
                raise ValueError(
                    f"{module}: `from {'.' * node.level} import ...` cannot be flattened; import names from a module"
                )
            target = importlib.util.resolve_name("." * node.level + node.module, package)
        elif (node.module or "").split(".")[0] == root:
            target = node.module
        else:
            continue
        found.append((node, target))
    return found


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def flatten_module(module: str) -> str:
    """The source of ``module`` as one self-contained file: the modules of its own package that it imports
    (transitively) come first, each without its package imports and ``__future__`` line, its docstring
    kept as a comment. A top-level name defined by two of them is an error (they now share one namespace)."""
    root = module.split(".")[0]
    order: list[str] = []
    parsed: dict[str, tuple[str, ast.Module, str]] = {}

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise ValueError(f"cannot flatten {module}: import cycle {' -> '.join((*stack, name))}")
        text, origin = _source(name)
        tree = ast.parse(text, filename=origin)
        parsed[name] = (text, tree, origin)
        for _, target in _internal_imports(tree, name, root):
            visit(target, (*stack, name))
        order.append(name)

    visit(module, ())
    owner: dict[str, str] = {}
    for name in order:
        for defined in _defined_names(parsed[name][1]):
            if defined in owner and not defined.startswith("__"):
                raise ValueError(
                    f"cannot flatten {module}: {defined!r} is defined in both {owner[defined]} and {name}; rename one"
                )
            owner[defined] = name

    try:
        version = metadata.version("diffusion2gan-toolkit")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parts = [
        f'"""{module}, flattened by diffusion2gan-toolkit {version} from '
        f"{', '.join(n.replace('.', '/') + '.py' for n in order)}.\n\n"
        "Self-contained (it imports torch, diffusers and transformers only), so that\n"
        '``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs it without that project.\n"""\n',
        "from __future__ import annotations\n",
    ]
    for name in order:
        parts.append(_stripped(name, *parsed[name], root=root))
    return "\n".join(parts)


def _stripped(name: str, text: str, tree: ast.Module, origin: str, *, root: str) -> str:
    lines = text.splitlines()
    drop: set[int] = set()
    header: list[str] = [f"# ---- {name.replace('.', '/')}.py " + "-" * max(4, 80 - len(name))]
    body = tree.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        header += [f"# {line}".rstrip() for line in body[0].value.value.strip().splitlines()]
        drop |= set(range(body[0].lineno - 1, body[0].end_lineno))
    aliases = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            drop |= set(range(node.lineno - 1, node.end_lineno))
    for node, _ in _internal_imports(tree, name, root):
        drop |= set(range(node.lineno - 1, node.end_lineno))
        aliases += [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
    kept = [line for i, line in enumerate(lines) if i not in drop]
    while kept and not kept[0].strip():
        kept.pop(0)
    return "\n".join([*header, "", *aliases, *kept]).rstrip() + "\n"


def save_standalone(pipe, save_directory: str | os.PathLike, **save_kwargs) -> Path:
    """``pipe.save_pretrained(save_directory)``, then the pipeline's and each custom component's code
    next to the weights, named in ``model_index.json`` as ``[module, class]`` lists.

    The folder loads with ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` anywhere
    diffusers and transformers are installed, and with this class's own ``from_pretrained``.
    """
    root = Path(save_directory)
    pipe.save_pretrained(str(root), **save_kwargs)
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    cls = type(pipe)
    (root / f"{PIPELINE_MODULE}.py").write_text(flatten_module(cls.__module__))
    index["_class_name"] = [PIPELINE_MODULE, cls.__name__]
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or entry[0] in STOCK_LIBRARIES:
            continue
        component = type(getattr(pipe, name))
        file = component.__module__.rpartition(".")[2]
        (root / name / f"{file}.py").write_text(flatten_module(component.__module__))
        index[name] = [file, component.__name__]
    tmp = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index_path)
    return root
