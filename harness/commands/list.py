"""`harness list`: the registered variants and their parameters (variants.registry)."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    import variants

    for name in variants.available():
        variant = variants.spec(name)
        print(f"{name}  [{variant.kind}]  {variant.doc}")
        for parameter, (type_name, default) in variants.describe(name).items():
            print(f"    {parameter}: {type_name} = {default!r}")
    return 0
