"""`python3 -m emailrelay` (and the zipapp) runs the program."""

from .main import entry

raise SystemExit(entry())
