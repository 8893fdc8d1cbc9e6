"""`python -m instructsae ...` is the `instructsae` command."""

from instructsae.cli import main

main()
