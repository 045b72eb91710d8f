"""`python -m unpact` is the CLI (also what `accelerate launch -m unpact` runs)."""

from unpact.cli import main

main()
