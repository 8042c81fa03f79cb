from doppel.cli import main

main()
