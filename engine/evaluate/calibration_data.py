"""The user's own calibration data: the dev split of a JSONL question/answer file.

fisher and regmean (``engine.merge.calibration``), BitDelta's scale distillation and DBMS
(``engine.compress.calibration``) calibrate on a zoo task's training prompts by default; given a
file they calibrate on it instead. The file is read by the own-data evaluator's rules
(``engine.evaluate.own_data.read_jsonl``: strict JSON lines ``{"prompt", "answer"}``, size caps,
UTF-8, every problem a one-line error naming the file and line) and only its **dev** split
(``split_of``) is ever used: the held-out half is what the user scores the merged or compressed
model on, and calibrating on it would be scoring on training data.

Each example is encoded as the zoo's calibration examples are (prompt, answer, end of sequence).
``draw(n, seed)``: ``n`` dev examples without replacement, the same for every model calibrated on
the file with that seed. A dev split smaller than ``n`` gives all its examples, and ``shortfall``
says so as a warning naming the file and both counts (our choice: refusing would make every
small file fail at the default ``n``; a shortfall is reported, never hidden). A file whose dev
split is empty is refused. Errors name the file and what named it (a recipe key, a CLI option).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, DeltaWorkbenchError
from engine.evaluate.own_data import read_jsonl

Example = tuple[str, str]


@dataclass(frozen=True)
class CalibrationData:
    """The dev-split examples of one JSONL file (see the module docstring)."""

    path: Path
    named_by: str                     # e.g. "recipe key parameters.calibration.data", "--calibration"
    examples: tuple[Example, ...]     # the dev split, in file order
    lines: int                        # examples in the whole file
    digest: str = field(default="")   # of the dev examples: a cache key that sees edits

    @classmethod
    def read(cls, path: str | Path, *, named_by: str) -> "CalibrationData":
        path = Path(path)
        try:
            whole = read_jsonl(path)
        except DeltaWorkbenchError as err:
            raise type(err)(f"{named_by}: {err.reason}", path=err.path or path) from None
        dev = whole.split("dev").examples
        if not dev:
            raise ConfigError(f"{named_by}: none of its {len(whole)} examples is in the dev split "
                              "(calibration uses the dev split only; the held-out half scores)",
                              path=path)
        digest = hashlib.sha256(json.dumps(dev).encode()).hexdigest()
        return cls(path, named_by, tuple(dev), len(whole), digest)

    def __len__(self) -> int:
        return len(self.examples)

    def draw(self, n: int, seed: int = 0) -> list[Example]:
        """``min(n, len(self))`` dev examples, drawn without replacement with ``seed``."""
        rng = random.Random(f"calibration-data:{seed}")  # str seeds are stable across runs
        return rng.sample(list(self.examples), min(n, len(self.examples)))

    def shortfall(self, n: int) -> str | None:
        """A warning when the dev split holds fewer than ``n`` examples, else None."""
        if n <= len(self.examples):
            return None
        return (f"{self.path}: {self.named_by}: {n} calibration examples asked, its dev split "
                f"holds {len(self.examples)} (of {self.lines}); all {len(self.examples)} are used")


__all__ = ["CalibrationData"]
