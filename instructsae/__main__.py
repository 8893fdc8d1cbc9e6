"""`python -m instructsae ...`: what torchrun launches (`torchrun ... -m instructsae extract ...`)."""

from instructsae.cli import main

main()
