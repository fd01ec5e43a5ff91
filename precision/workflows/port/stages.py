"""The port's stages as resumable steps: a stamp per stage, progress lines, one-line failures.

Each stage writes ``stages/NAME.json`` in the port folder once it has finished: the key of
its inputs (a SHA-256 of the model's fingerprint, the options it ran with, the device and
libraries, the precision version and what the stages it builds on produced), the files it
wrote with their size, modification time and a digest of their bytes, and its outcome
(JSON-ready). A later run whose key is the same and whose files are all still there,
unchanged (the same size and time, or where the time moved, as a copy of the folder moves
it, the same bytes), reuses the outcome and says so; ``force`` redoes every stage. What a
stage produced, for the stages after it, is its key and its files' digests: a stage redone
with other results, or a file of it changed or replaced since, makes every stage built on
it run again. A stamp is written whole or not at all
(:func:`precision.dumps.atomic.write_output`), after the stage's files, so an interrupted
run leaves the stages that finished usable and redoes the one it stopped in.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...dumps.atomic import write_output
from ...errors import PrecisionError

Log = Callable[[str], None]
#: a stage's outcome: JSON-ready, with the files it wrote (relative to the port folder)
Outcome = dict[str, Any]
STAMPS = "stages"


class StageError(PrecisionError):
    """A stage that raised: the port stops there, the finished stages' files and stamps kept.

    ``exit_code`` is 2 when the stage was refused for bad input (a :class:`PrecisionError`:
    a device, a model folder, a prompt file), 1 when it failed while running (anything else).
    """

    def __init__(self, stage: str, error: BaseException) -> None:
        self.stage = stage
        self.error = error
        self.exit_code = 2 if isinstance(error, PrecisionError) else 1
        what = str(error) if isinstance(error, PrecisionError) else (
            f"{type(error).__name__}: {error}")
        super().__init__(f"port stopped in stage '{stage}': {what} (the stages before it are "
                         "kept; run again to resume)")


@dataclass(frozen=True)
class StageRun:
    """How one stage went in this run: its seconds (0 when reused) and whether it was."""

    name: str
    seconds: float
    reused: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 3), "reused": self.reused}


def key_of(inputs: Mapping[str, Any]) -> str:
    """A SHA-256 prefix of ``inputs`` as canonical JSON (sorted keys)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_digest(path: Path) -> str:
    """SHA-256 prefix of a file's bytes, read in pieces (a dump may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 22), b""):
            h.update(piece)
    return h.hexdigest()[:16]


def signatures(folder: Path, files: list[str]) -> dict[str, list[Any]] | None:
    """``[size, mtime_ns, digest]`` of each of a stage's files; None when one is missing."""
    out: dict[str, list[Any]] = {}
    for f in files:
        try:
            st = (folder / f).stat()
            out[f] = [st.st_size, st.st_mtime_ns, content_digest(folder / f)]
        except OSError:
            return None
    return out


def unchanged(folder: Path, stamped: Any) -> bool:
    """Whether every file of a stamp's ``signatures`` is as stamped: the same size, and the
    same modification time or, when that moved (a copy of the folder, an archive
    unpacked), the same bytes."""
    if not isinstance(stamped, dict):
        return False
    for f, sig in stamped.items():
        try:
            st = (folder / f).stat()
            if not (isinstance(sig, list) and len(sig) == 3 and st.st_size == sig[0] and (
                    st.st_mtime_ns == sig[1] or content_digest(folder / f) == sig[2])):
                return False
        except OSError:
            return False
    return True


def file_digest(path: str | None) -> str | None:
    """SHA-256 prefix of a file's bytes (a prompts or feed file an input depends on)."""
    if not path:
        return None
    p = Path(path)
    return content_digest(p) if p.is_file() else f"missing:{p}"


class Stages:
    """Runs the port's stages in ``folder``, reusing finished ones (see the module doc)."""

    def __init__(self, folder: Path, *, force: bool, log: Log) -> None:
        self.folder = folder
        self.force = force
        self.log = log
        self.runs: list[StageRun] = []
        self.keys: dict[str, str] = {}
        self._digests: dict[str, dict[str, str]] = {}  # per stage, its files' contents

    def stamp_path(self, name: str) -> Path:
        return self.folder / STAMPS / f"{name}.json"

    def _reusable(self, name: str, key: str) -> Outcome | None:
        path = self.stamp_path(name)
        if self.force or not path.is_file():
            return None
        try:
            stamp = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        sigs = stamp.get("signatures")
        if stamp.get("key") != key or not unchanged(self.folder, sigs) or \
                set(sigs) != set(stamp.get("files", [])):
            return None  # other inputs, or a file missing, changed or replaced since
        self._digests[name] = {f: sig[2] for f, sig in sigs.items()}
        outcome: Outcome = stamp["outcome"]
        return outcome

    def _files_of(self, name: str) -> set[str]:
        """The files stage ``name``'s stamp lists (none without a readable stamp)."""
        try:
            files = json.loads(self.stamp_path(name).read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            return set()
        return {f for f in files if isinstance(f, str)}

    def _remove(self, files: set[str]) -> None:
        """Delete files a stamp listed, inside the port folder only."""
        root = self.folder.resolve()
        for f in files:
            path = (self.folder / f).resolve()
            if root in path.parents and path.is_file():
                path.unlink()

    def retire_others(self) -> list[str]:
        """Remove the stamps and files of stages this run did not take (a fix from an
        earlier run that failed, when this one passes): the folder holds this run's outputs
        alone. Returns the stages retired."""
        ran = {r.name for r in self.runs}
        gone = []
        for stamp in sorted((self.folder / STAMPS).glob("*.json")):
            if stamp.stem not in ran:
                self._remove(self._files_of(stamp.stem))
                stamp.unlink()
                gone.append(stamp.stem)
        return gone

    def _produced(self, name: str, key: str) -> None:
        """What stage ``name`` produced, as the stages after it see it (module doc): its key
        and its files' contents."""
        self.keys[name] = key_of({"key": key, "files": self._digests.get(name, {})})

    def run(self, name: str, title: str, inputs: Mapping[str, Any],
            work: Callable[[], Outcome], *, after: tuple[str, ...] = ()) -> Outcome:
        """The outcome of stage ``name``: reused when its stamp's key is that of ``inputs``
        (and of the stages ``after`` it builds on), else ``work()`` run and stamped. One
        progress line either way: ``title``, the time it took or ``reused``."""
        full = {"stage": name, "inputs": dict(inputs), "precision": __version__,
                "after": {a: self.keys[a] for a in after}}
        key = key_of(full)
        outcome = self._reusable(name, key)
        if outcome is not None:
            self._produced(name, key)
            self.runs.append(StageRun(name, 0.0, True))
            self.log(f"{name}: reused ({title}; inputs unchanged)")
            return outcome
        before = self._files_of(name)
        start = time.perf_counter()
        try:
            outcome = work()
        except KeyboardInterrupt:
            raise
        except StageError:
            raise
        except Exception as exc:  # one line naming the stage; the finished stages stay
            raise StageError(name, exc) from exc
        seconds = time.perf_counter() - start
        files = outcome.get("files", [])
        sigs = signatures(self.folder, files)
        self._digests[name] = {f: sig[2] for f, sig in (sigs or {}).items()}
        self.stamp_path(name).parent.mkdir(parents=True, exist_ok=True)
        write_output(self.stamp_path(name), json.dumps(
            {"stage": name, "key": key, "inputs": full, "files": files, "signatures": sigs,
             "seconds": round(seconds, 3), "outcome": outcome}, indent=1, default=str) + "\n",
            force=True)
        self._produced(name, key)
        self._remove(before - set(files))  # what the stage's last run wrote and this did not
        self.runs.append(StageRun(name, seconds, False))
        self.log(f"{name}: {seconds:.1f} s ({title})")
        return outcome
