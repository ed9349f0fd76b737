"""The helper programs (bin/emailrelay-submit, -resubmit, -filter-copy).

Each module has a `run(argv=None) -> int` entry point returning the exit
status; the launchers in bin/ call it.
"""
