"""``python -m kpfast.train``: see :mod:`kpfast.train.cli`."""

if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main())
