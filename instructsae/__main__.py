"""`python -m instructsae ...` is the `instructsae` command (what torchrun launches: `torchrun ... -m instructsae
extract ...`)."""

from instructsae.cli import main

main()
