"""import-linter contract types of this project (registered in pyproject.toml's
`contract_types`; `tools/lint_imports.py` puts this folder on the path).

`private_modules`: a `forbidden` contract whose forbidden modules are not listed but found
in the import graph each run: every module of the root packages with a part of its dotted name,
after the root, starting with an underscore (`toolpool._pool`, `toolpool.auth._layer`,
`toolpool.testing.__main__`). A new private module of the core is covered the moment it
exists; the public modules are the others (`toolpool`, `toolpool.errors`, `toolpool.auth`,
`toolpool.testing.storm`, ...). The source modules' own private modules are theirs to import.
Every option of `forbidden` except `forbidden_modules` applies.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.domain import fields
from importlinter.domain.contract import ContractCheck, InvalidContractOptions
from importlinter.domain.helpers import module_expressions_to_modules
from importlinter.domain.imports import ModuleExpression


def is_private(module: str) -> bool:
    """Whether a dotted module name names a private module: a part after the root package
    starts with an underscore."""
    return any(part.startswith("_") for part in module.split(".")[1:])


class PrivateModulesContract(ForbiddenContract):
    """The source modules import no private module of the root packages (see the module
    docstring)."""

    type_name = "private_modules"

    # Found in the graph by `check`, never listed.
    forbidden_modules = fields.SetField(subfield=fields.ModuleExpressionField(), required=False)

    def validate(self) -> None:
        if self.forbidden_modules:
            raise InvalidContractOptions(
                {
                    "forbidden_modules": "a private_modules contract finds the private "
                    "modules itself; remove forbidden_modules (or use type = 'forbidden')"
                }
            )
        super().validate()

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = tuple(self.session_options["root_packages"])
        sources = [
            m.name
            for m in module_expressions_to_modules(graph, self.source_modules)  # type: ignore[attr-defined]
        ]
        private = sorted(
            module
            for module in graph.modules
            if module.split(".")[0] in roots
            and is_private(module)
            and not any(module == s or module.startswith(s + ".") for s in sources)
        )
        if not private:
            raise InvalidContractOptions(
                {"forbidden_modules": f"no private module found under {', '.join(roots)}"}
            )
        self.forbidden_modules = {ModuleExpression(m) for m in private}
        return super().check(graph, verbose)
