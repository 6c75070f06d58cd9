"""Fill the sbatch templates in slurm/: `{{ name }}` placeholders and `{{> file }}` includes.

Bash uses `${...}` itself, so the templates use a syntax bash never does. Every placeholder must get
a value and every value must be used, so a template and its renderer cannot drift apart silently.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

TEMPLATE_DIR = Path(os.environ.get("RAE_SCALE_SLURM_TEMPLATES", Path(__file__).resolve().parents[1] / "slurm"))

_INCLUDE = re.compile(r"^[ \t]*\{\{>\s*([\w.\-]+)\s*\}\}[ \t]*\n", re.MULTILINE)
_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class TemplateError(ValueError):
    """A template names a value that was not given, or a given value is not used."""


def _read(name: str, template_dir: Path) -> str:
    path = template_dir / name
    if not path.is_file():
        have = sorted(p.name for p in template_dir.glob("*.sbatch")) if template_dir.is_dir() else []
        raise TemplateError(f"no template '{name}' in {template_dir}; available: {', '.join(have) or 'none'}")
    return path.read_text()


def expand_includes(text: str, template_dir: Path, _depth: int = 0) -> str:
    if _depth > 4:
        raise TemplateError("template includes nest deeper than 4 levels (an include cycle?)")
    return _INCLUDE.sub(lambda m: expand_includes(_read(m.group(1), template_dir), template_dir, _depth + 1),
                        text)


def render_template(name: str, values: Mapping[str, object], template_dir: Path | None = None) -> str:
    """The template `name` with its includes expanded and every `{{ field }}` replaced."""
    template_dir = Path(template_dir or TEMPLATE_DIR)
    text = expand_includes(_read(name, template_dir), template_dir)
    wanted = set(_FIELD.findall(text))
    missing = sorted(wanted - set(values))
    if missing:
        raise TemplateError(f"template '{name}' needs values for: {', '.join(missing)}")
    unused = sorted(set(values) - wanted)
    if unused:
        raise TemplateError(f"template '{name}' has no placeholder for: {', '.join(unused)}")
    return _FIELD.sub(lambda m: str(values[m.group(1)]), text)
