"""Subject labels of embeddings: from folder names or from a labels file.

Shared by ``veilface embed`` (labels stored next to the embeddings) and ``veilface eval``
(labels for an ``.npz`` that has none, or that should be relabelled).

Labels file (``--labels FILE``), UTF-8 text, ``#`` comments and blank lines ignored, either

* ``PHOTO_PATH<TAB>LABEL`` (or ``PHOTO_PATH LABEL``: the last whitespace-separated field is the
  label) per line -- a photo is found by its path as given, its absolute path, or its file name
  (when no other photo and no other line has that name); or
* one ``LABEL`` per line, in the order of the embeddings (eval only).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameter

_FORMAT_HINT = "want lines 'PHOTO_PATH<TAB>LABEL' (or one LABEL per line, in the order of the embeddings)"


@dataclass
class LabelsFile:
    """A parsed labels file: ``by_path`` (path -> label) or ``per_row`` (labels in row order)."""

    path: str
    by_path: dict[str, str] | None = None
    per_row: list[str] | None = None

    def for_paths(self, paths: Sequence[str | Path]) -> list[str]:
        """The label of each photo path; raises naming the first photo the file does not label."""
        if self.by_path is None:
            raise InvalidParameter(f"{self.path}: has one label per line, not 'PHOTO_PATH LABEL' lines; "
                                   "photos cannot be matched to it")
        exact = self.by_path
        absolute = {str(Path(k).resolve()): v for k, v in exact.items()}
        names: dict[str, str | None] = {}
        for k, v in exact.items():
            name = Path(k).name
            names[name] = v if name not in names or names[name] == v else None  # ambiguous -> None
        photo_names: dict[str, int] = {}
        for p in paths:
            photo_names[Path(p).name] = photo_names.get(Path(p).name, 0) + 1
        out, missing = [], []
        for p in paths:
            label = exact.get(str(p)) or absolute.get(str(Path(p).resolve()))
            if label is None and photo_names[Path(p).name] == 1:  # a file name only when it names one photo
                label = names.get(Path(p).name)
            if label is None:
                missing.append(str(p))
            out.append(label)
        if missing:
            raise InvalidParameter(f"{self.path}: no label for {len(missing)} photo(s) (first: {missing[0]}); "
                                   "add a line 'PHOTO_PATH<TAB>LABEL' for each")
        return out

    def for_rows(self, n: int, paths: Sequence[str] | None = None) -> list[str]:
        """Labels of ``n`` embeddings (in row order, or matched through their source ``paths``)."""
        if self.per_row is not None:
            if len(self.per_row) != n:
                raise InvalidParameter(f"{self.path}: {len(self.per_row)} labels for {n} embeddings; "
                                       "give one label per embedding, in order")
            return list(self.per_row)
        if paths is None:
            raise InvalidParameter(f"{self.path}: labels by photo path, but the embeddings file has no "
                                   "'paths' array; give one label per line in the order of the embeddings")
        return self.for_paths(paths)


def read_labels_file(path: str | Path) -> LabelsFile:
    """Parse a labels file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidParameter(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidParameter(f"labels file {path} is not UTF-8 text") from None
    pairs: list[tuple[str, str]] = []
    singles: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            p, _, label = line.rpartition("\t")
        else:
            p, _, label = line.rpartition(" ")
        p, label = p.strip(), label.strip()
        if p:
            pairs.append((p, label))
        else:
            singles.append(label)
        if pairs and singles:
            raise InvalidParameter(f"{path}:{n}: mixes 'PHOTO_PATH LABEL' lines and label-only lines; {_FORMAT_HINT}")
    if not pairs and not singles:
        raise InvalidParameter(f"labels file {path} is empty; {_FORMAT_HINT}")
    if singles:
        return LabelsFile(str(path), per_row=singles)
    by_path: dict[str, str] = {}
    for p, label in pairs:
        if by_path.get(p, label) != label:
            raise InvalidParameter(f"{path}: photo {p} has two labels ({by_path[p]!r}, {label!r})")
        by_path[p] = label
    return LabelsFile(str(path), by_path=by_path)


def folder_label(photo: Path, root: Path) -> str | None:
    """The person of ``photo`` found under the folder ``root``: the first sub-folder of ``root``
    on its path (``root/<person>/.../photo.jpg``); None for photos directly in ``root``."""
    rel = photo.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None
