"""Build ``docstring_topics.jsonl``: a small, real, offline 4-class text set from stdlib docstrings.

Each example is the first paragraph of a public member's docstring, labelled by module family.
The output is committed, so results do not drift with the Python version; re-run to rebuild:
``python tests/data/make_docstring_topics.py``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

FAMILIES = {
    "numbers": ["math", "statistics", "cmath", "decimal", "fractions", "random"],
    "files": ["os", "shutil", "pathlib", "tempfile", "glob", "filecmp", "os.path"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs"],
    "data": ["json", "csv", "pickle", "datetime", "calendar", "sqlite3", "zipfile"],
}
PER_CLASS = 90


def first_paragraph(obj) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text if len(text) > 30 else None


def main() -> None:
    rng = random.Random(0)
    rows = []
    for label, modules in FAMILIES.items():
        seen, texts = set(), []
        for name in modules:
            module = importlib.import_module(name)
            for attr in sorted(dir(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or inspect.ismodule(obj):
                    continue
                text = first_paragraph(obj)
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
        rng.shuffle(texts)
        rows += [{"text": t, "label": label} for t in sorted(texts[:PER_CLASS])]
    rng.shuffle(rows)
    out = Path(__file__).with_name("docstring_topics.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
