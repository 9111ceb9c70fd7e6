"""Dataset providers (kind ``dataset``): read a source into a list of documents (strings).

``txt`` (default): a UTF-8 text file, or every ``*.txt`` file of a directory (sorted, not recursive), one document
per file; bytes that are not UTF-8 are kept as they are (surrogate escapes, which the tokenizers encode back to
the same bytes), CRLF stays CRLF.
``jsonl``: one JSON object per line; the document is the string field ``text_field`` (default ``text``).
A missing path is a FileNotFoundError; a malformed JSONL line (invalid JSON or UTF-8, no such field, a field that
is not a string) is a ValueError naming the file and line. A leading UTF-8 byte-order mark is skipped.
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
            files = sorted(f for f in p.glob("*.txt") if f.is_file())
            if not files:
                raise FileNotFoundError(f"dataset txt: no *.txt files in directory {p}")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"dataset txt: no such file or directory: {p}")
        from ..data.tokenizers import read_text_file  # apt.data imports the registry, which imports this

        return [read_text_file(f) for f in files]


class JsonlDataset(DatasetProvider):
    name = "jsonl"
    description = "JSON lines, one document per line in field text_field (default 'text')"

    def load_texts(self, path: Union[str, os.PathLike], text_field: str = "text", **kw: Any) -> list[str]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dataset jsonl: no such file: {p}")
        out = []
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):  # by b"\n" only: JSON strings may hold U+2028 raw
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: not UTF-8: {exc}") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: invalid JSON: {exc}") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: no field {text_field!r}")
                text = obj[text_field]
                if not isinstance(text, str):  # str() trained the model on 'None', '5' or "['a']"
                    raise ValueError(f"dataset jsonl: {p}:{lineno}: field {text_field!r} is "
                                     f"{type(text).__name__} {text!r}, expected a string")
                out.append(text)
        if not out:
            raise ValueError(f"dataset jsonl: {p} holds no documents")
        return out


PROVIDERS = [TxtDataset, JsonlDataset]
