"""Dataset providers (kind ``dataset``): read a source into a list of documents (strings).

``txt`` (default): a UTF-8 text file, or every ``*.txt`` file of a directory (sorted), one document per file.
``jsonl``: one JSON object per line; the document is the field ``text_field`` (default ``text``).
A missing path is a FileNotFoundError; a malformed JSONL line is a ValueError naming the file and line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Union

from ..core.registry import Provider


class DatasetProvider(Provider):
    kind: ClassVar[str] = "dataset"

    def load_texts(self, path: Union[str, os.PathLike], **kw: Any) -> list[str]:
        raise NotImplementedError


class TxtDataset(DatasetProvider):
    name = "txt"
    is_default = True
    description = "plain UTF-8 text file(s): a file, or every *.txt in a directory"

    def load_texts(self, path: Union[str, os.PathLike], **kw: Any) -> list[str]:
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"dataset txt: no *.txt files in directory {p}")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"dataset txt: no such file or directory: {p}")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]


class JsonlDataset(DatasetProvider):
    name = "jsonl"
    description = "JSON lines, one document per line in field text_field (default 'text')"

    def load_texts(self, path: Union[str, os.PathLike], text_field: str = "text", **kw: Any) -> list[str]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dataset jsonl: no such file: {p}")
        out = []
        with open(p, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: invalid JSON: {exc}") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: no field {text_field!r}")
                out.append(str(obj[text_field]))
        if not out:
            raise ValueError(f"dataset jsonl: {p} holds no documents")
        return out


PROVIDERS = [TxtDataset, JsonlDataset]
