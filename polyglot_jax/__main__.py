"""`python -m polyglot_jax SUBCOMMAND` is the same as `polyglot-jax SUBCOMMAND`."""

from polyglot_jax.cli import main

if __name__ == "__main__":
    main()
