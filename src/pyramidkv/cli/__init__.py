"""The ``pyramidkv`` command line: each command parses its options and calls the library's public API.

Nothing in the library imports this package.
"""

from pyramidkv.cli.app import app, main

__all__ = ["app", "main"]
