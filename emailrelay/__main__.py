"""`python3 -m emailrelay` (and the zipapp) runs the program."""

from .main import run

raise SystemExit(run())
