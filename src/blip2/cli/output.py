"""What the commands print: one record per line, valid UTF-8, names and texts escaped (see `blip2.cli`)."""

from __future__ import annotations

import json

import click

from ..embeddings_io import path_fields, valid_text

# Characters that would break a line or a column of the output, and how they are written instead.
_BREAKS = {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}
_BREAKS |= {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in _BREAKS}
_BREAKS |= {0x2028: "\\u2028", 0x2029: "\\u2029"}  # line separators to str.splitlines
# In the fields of the plain output a backslash is escaped too, so that every escape reads back one way.
_FIELD_ESCAPES = {ord("\\"): "\\\\", **_BREAKS}
_JSON_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}  # only ever inside JSON strings


def emit(path: str, result, as_json: bool, fields, show_path: bool) -> bool:
    """Print one result line; return True when it is an error."""
    if isinstance(result, Exception):
        if as_json:
            click.echo(json_line({**path_fields(path), "error": str(result)}))
        else:
            click.echo(f"blip2: error: {message(str(result))}", err=True)
        return True
    if as_json:
        click.echo(json_line({**path_fields(path), **fields(result)}))
    else:
        click.echo(f"{cell(path)}\t{cell(result)}" if show_path else cell(result))
    return False


def cell(text: str) -> str:
    """`text` for one field of the plain output: valid UTF-8, no tab or line break (see the module doc)."""
    return valid_text(text.translate(_FIELD_ESCAPES))


def message(text: str) -> str:
    """`text` for a message on stderr: valid UTF-8, on one line."""
    return valid_text(text.translate(_BREAKS))


def json_line(record: dict) -> str:
    """One JSON line, valid UTF-8 whatever the strings in it hold (see `valid_text`); the line breaks that
    json leaves raw (NEL, U+2028, U+2029: str.splitlines splits on them) are written as \\u escapes."""
    return json.dumps(_valid(record), ensure_ascii=False).translate(_JSON_BREAKS)


def _valid(value):
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, dict):
        return {k: _valid(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid(v) for v in value]
    return value
