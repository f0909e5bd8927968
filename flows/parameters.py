"""The `finetune` and `sweep` flows' parameters: every key of params.yaml, typed and optional, as Prefect's UI
shows them in its run form (*Run > Custom run*), plus `sets` (dotted KEY=VALUE, as `tuneline run --set`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from tuneline.config import DEFAULT_PARAMS, Params, load_params


def _optional(model: type[BaseModel]) -> type[BaseModel]:
    """The same model with every field optional and None by default, sections included."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):  # a section: always there, its keys optional
            section = _optional(ann)
            fields[name] = (section, Field(default_factory=section, alias=info.alias))
            continue
        if info.metadata:
            ann = Annotated[(ann, *info.metadata)]
        fields[name] = (Optional[ann], Field(None, alias=info.alias, description=info.description))  # noqa: UP045
    doc = (model.__doc__ or f"{model.__name__} section of params.yaml.").strip()
    return create_model(f"{model.__name__}Overrides",
                        __config__=ConfigDict(extra="forbid", populate_by_name=True, title=model.__name__),
                        __doc__=doc + " Empty keys keep their value from params.yaml.", **fields)


ParamsOverrides = _optional(Params)
NO_OVERRIDES = ParamsOverrides()


def _filled(tree: Any) -> Any:
    """The keys of the form that were filled in: empty (None) keys keep params.yaml's value."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json", by_alias=True)
    if isinstance(tree, dict):
        return {key: _filled(value) for key, value in tree.items() if value is not None}
    return tree


def resolve_params(params_path: str | Path = DEFAULT_PARAMS, overrides: Any = None,
                   sets: list[str] | None = None) -> Params:
    """params.yaml, then the typed overrides, then the dotted `sets`; validated once, naming the keys at fault."""
    return load_params(params_path, list(sets or []), layer=_filled(overrides or {}))
