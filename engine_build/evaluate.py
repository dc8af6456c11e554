"""The authors' evaluation protocol on their list format (``IMAGE LABEL`` lines)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ConfigError, DecodeError
from .imaging import decode
from .preprocess import LABELS
from .runtime.base import Backend

NON_FINITE = "non_finite_output"     # the reason an image whose probabilities are NaN or infinite is skipped


@dataclass
class Evaluation:
    total: int
    correct: int
    confusion: np.ndarray          # [true, predicted]
    skipped: list[tuple[str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def report(self) -> str:
        lines = [f"accuracy {self.accuracy:.4f} ({self.correct}/{self.total})",
                 "confusion (rows true, columns predicted):",
                 f"{'':>10}{LABELS[0]:>10}{LABELS[1]:>10}{'count':>8}"]
        for i, name in enumerate(LABELS):
            lines.append(f"{name:>10}{self.confusion[i, 0]:>10}{self.confusion[i, 1]:>10}{self.confusion[i].sum():>8}")
        missing = [name for name, why in self.skipped if why == "missing"]
        no_answer = [name for name, why in self.skipped if why == NON_FINITE]
        unreadable = [(name, why) for name, why in self.skipped if why not in ("missing", NON_FINITE)]
        if missing:
            lines.append(f"skipped {len(missing)} listed images missing from the folder: {_first(missing)}")
        if no_answer:
            lines.append(f"skipped {len(no_answer)} images the model gave NaN or infinite probabilities for "
                         f"(no class): {_first(no_answer)}")
        if unreadable:
            lines.append(f"skipped {len(unreadable)} unreadable images: "
                         + _first([f"{name} ({why})" for name, why in unreadable]))
        return "\n".join(lines)


def _first(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def read_list(path: Path) -> list[tuple[str, int]]:
    """``IMAGE LABEL`` lines; a malformed line is a one-line error naming it."""
    entries = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read list {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1"):
            raise ConfigError(f"{path}:{number}: expected 'IMAGE LABEL' with label 0 or 1, got {line.strip()!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise ConfigError(f"list {path} is empty")
    return entries


def evaluate(backend: Backend, images_dir: Path, entries: list[tuple[str, int]], batch: int = 16,
             progress: bool | None = None) -> Evaluation:
    """Accuracy and confusion of ``backend`` on the listed images; missing and unreadable ones, and those
    whose probabilities are NaN or infinite (no class, where argmax would say 0), are counted apart."""
    confusion = np.zeros((2, 2), dtype=int)
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, np.ndarray, int]] = []

    def flush() -> None:
        if pending:
            probs = backend.infer(np.stack([p[1] for p in pending])).probs
            for (name, _, truth), row in zip(pending, probs, strict=True):
                if np.isfinite(row).all():
                    confusion[truth, row.argmax()] += 1
                else:
                    skipped.append((name, NON_FINITE))
            pending.clear()

    for name, label in tqdm(entries, desc="evaluating", unit="img", disable=None if progress is None else not progress):
        path = Path(images_dir) / name
        try:
            pending.append((name, decode(path.read_bytes()), label))
        except (FileNotFoundError, IsADirectoryError):
            skipped.append((name, "missing"))
        except DecodeError as exc:
            skipped.append((name, exc.reason))
        if len(pending) >= batch:
            flush()
    flush()
    if not confusion.sum():
        missing = sum(why == "missing" for _, why in skipped)
        no_answer = sum(why == NON_FINITE for _, why in skipped)
        raise ConfigError(f"none of the {len(entries)} listed images could be evaluated from {images_dir}: "
                          f"{missing} missing, {len(skipped) - missing - no_answer} unreadable, {no_answer} with NaN "
                          f"or infinite probabilities (first: {skipped[0][0]}, {skipped[0][1]})")
    return Evaluation(int(confusion.sum()), int(np.trace(confusion)), confusion, skipped)
