"""Fill the ``${Name}`` parameters of a JSON file in deploy/ and print it.

    python3 deploy/render.py deploy/iam/publisher-trust.json \\
        PublisherAccountId=123456789012 ExternalId=my-secret-value

Parameters come from NAME=value arguments, else from environment variables of the same
name. A parameter left without a value, or a result that is not valid JSON, is an error
(exit 2) naming it: nothing half-filled reaches AWS. Standard library only.
"""

from __future__ import annotations

import json
import os
import string
import sys


class RenderError(Exception):
    """A parameter without a value, a malformed argument, or a result that is not JSON."""


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with every ``${Name}`` replaced by ``values[Name]``; all must be given."""
    template = string.Template(text)
    missing = sorted(set(template.get_identifiers()) - values.keys())
    if missing:
        raise RenderError(f"no value for {', '.join(missing)} (give NAME=value or set it)")
    return template.substitute(values)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    path, *pairs = argv
    values = {name: value for name, value in os.environ.items() if name.isidentifier()}
    try:
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise RenderError(f"expected NAME=value, got {pair!r}")
            values[name] = value
        with open(path, encoding="utf-8") as file:
            text = render(file.read(), values)
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise RenderError(f"{path} is not valid JSON once filled: {exc}") from exc
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
