"""Print the README's two top commands (set-up + main job, set-up + tests), one per line.

They are the non-comment lines of the README's first ```sh block; CI runs the second, and a test
checks that there are exactly two.
"""

import pathlib
import sys


def readme_commands(path: pathlib.Path) -> list[str]:
    lines = path.read_text().splitlines()
    start = lines.index("```sh") + 1
    end = lines.index("```", start)
    return [line for line in lines[start:end] if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    print("\n".join(readme_commands(root / "README.md")))
    sys.exit(0)
