"""Commands beyond config and db; kept apart so cli.py stays short."""
