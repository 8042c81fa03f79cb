from doppel.cli import run

run()
