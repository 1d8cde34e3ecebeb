"""Fixtures of the memory_services tests: one thread per torch op (the machine is shared), and
a real text set, stdlib docstrings embedded once per session with the bundled MiniLM."""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a busy 2-core box
    yield
    torch.set_num_threads(before)


def stdlib_docstrings(limit: int) -> list[str]:
    """First paragraphs of function/class docstrings of this interpreter's stdlib, deduplicated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("[a-z]*/*.py")):
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    text = " ".join(doc.split("\n\n")[0].split())[:240]
                    if len(text) >= 40:
                        seen.setdefault(text, None)
    texts = list(seen)
    stride = max(1, len(texts) // limit)
    return texts[::stride][:limit]


@pytest.fixture(scope="session")
def docstring_embeddings() -> tuple[list[str], np.ndarray]:
    """(texts, unit embeddings) for 1200 stdlib docstrings, embedded once per test session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainmem.memory_services import MiniLMEmbedder

    texts = stdlib_docstrings(1200)
    embed = MiniLMEmbedder(batch_size=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        vecs = embed(texts)
    finally:
        torch.set_num_threads(threads)
    return texts, vecs
