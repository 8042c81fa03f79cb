"""Print the README's configuration table from the Settings fields (run after adding a setting)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doppel.settings import Settings  # noqa: E402


def main() -> None:
    print("| setting | environment variable | default | what it is |")
    print("|---|---|---|---|")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "—" if default in (None, "") else f"`{default}`"
        print(f"| `{name}` | `DOPPEL_{name.upper()}` | {shown} | {field.description or ''} |")


if __name__ == "__main__":
    main()
