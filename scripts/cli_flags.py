"""Write docs/CLI-FLAGS.md, the table of every command's numeric flags and valid ranges, from the parser itself."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout this script lives in, not another installed copy

from treeq.cli import build_parser  # noqa: E402
from treeq.flags import flags_table  # noqa: E402

if __name__ == "__main__":
    path = ROOT / "docs" / "CLI-FLAGS.md"
    path.write_text(flags_table(build_parser()))
    print(f"wrote {path}")
