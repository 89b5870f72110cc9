"""``python -m kpfast.train``: see :mod:`kpfast.train.cli`."""

if __name__ == "__main__":
    import sys

    from .cli import main, reexec_with_passive_openmp

    reexec_with_passive_openmp()
    sys.exit(main())
