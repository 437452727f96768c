"""What a renderer returns, and the YAML text it is written in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MARKER", "Rendering", "header", "yaml_documents"]

#: The first words of every rendered file: ``mesh deploy render`` replaces (and removes,
#: when stale) only files that start with them, never files a user wrote.
MARKER = "# Rendered by mesh deploy render"


@dataclass(frozen=True)
class Rendering:
    """Rendered files by name (relative to the output folder), and what the user should know."""

    files: Mapping[str, str]
    #: Things that will not stop the render but will stop the mesh (said on stderr).
    warnings: tuple[str, ...] = field(default=())
    #: Files to mark executable.
    executable: frozenset[str] = field(default=frozenset())


def header(source: str, mesh: str, note: str = "") -> str:
    """The comment at the top of every rendered file (no dates: a re-render is byte-identical)."""
    lines = [f"{MARKER} from {source} (mesh {mesh}); edit the topology and render again."]
    lines += [f"# {line}" if line else "#" for line in note.splitlines()]
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (scripts, the topology) as ``|`` literals."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # lists indented under their key, as kubectl and most manifests write them
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def yaml_documents(documents: Iterable[Mapping[str, Any]]) -> str:
    """``documents`` as one multi-document YAML text, keys in the order given."""
    return "".join("---\n" + yaml.dump(dict(doc), Dumper=_Dumper, sort_keys=False,
                                       default_flow_style=False, width=100)
                   for doc in documents)


def yaml_text(document: Mapping[str, Any]) -> str:
    """One document, no ``---``."""
    return yaml.dump(dict(document), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100)
