"""Subcommands of the ``lorart`` CLI, one module each (see ``lorart.cli``)."""
