"""An import-linter contract type of Tuneline's own (pyproject.toml [tool.importlinter]).

`private_names`: no module imports an underscore name (`from tuneline.x import _helper`) from another
module of the project. A name that others need is part of its module's interface: name it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.application import output
from importlinter.domain.contract import Contract, ContractCheck


def _source(module: str) -> Path | None:
    """The module's file, found from its name under the working folder (the repo): importing it to ask would
    run the project's code and load its libraries."""
    path = Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class PrivateNamesContract(Contract):
    type_name = "private_names"

    def check(self, graph, verbose: bool) -> ContractCheck:
        broken = []
        for module in sorted(graph.modules):
            path = _source(module)
            if path is None:
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                    continue
                if node.module.split(".")[0] not in graph.modules:  # a library's, not the project's
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    broken.append(f"{module}:{node.lineno} imports {', '.join(private)} from {node.module}")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["broken"]:
            output.print_error(line, bold=False)
