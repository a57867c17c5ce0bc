"""Several model names over one loaded GGUF, each with its own sampling defaults.

``gemma-fast:temperature=0,max_tokens=64;gemma-warm:temperature=0.8,top_p=0.95``
serves the node's model under two more names. A request naming an alias gets
the alias's values for every sampling field it leaves at zero (the proto's
"use the default"); fields it sets win.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument

#: Sampling fields an alias may set, with their types.
ALIAS_FIELDS: Mapping[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
    "max_tokens": int, "seed": int,
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelAlias:
    name: str
    defaults: Mapping[str, float | int] = field(default_factory=dict)


def parse_aliases(text: str, field_name: str = "model_aliases") -> dict[str, ModelAlias]:
    aliases: dict[str, ModelAlias] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, body = part.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise InvalidArgument(f"{field_name}: {name!r} is not a model name", field=field_name)
        if name in aliases:
            raise InvalidArgument(f"{field_name}: {name!r} is given twice", field=field_name)
        defaults: dict[str, float | int] = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in ALIAS_FIELDS:
                raise InvalidArgument(f"{field_name}: {item!r} in {name!r}: expected one of "
                                      f"{', '.join(ALIAS_FIELDS)} as key=value", field=field_name)
            try:
                defaults[key] = ALIAS_FIELDS[key](value.strip())
            except ValueError:
                raise InvalidArgument(f"{field_name}: {key}={value!r} in {name!r} is not a number",
                                      field=field_name) from None
        aliases[name] = ModelAlias(name, defaults)
    return aliases
