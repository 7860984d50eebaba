"""Dialogue corpora: MultiWOZ 2.1 / 2.2, Schema-Guided Dialogue and CamRest676.

Supported on-disk formats (each file may be plain ``.json`` or compressed as
``.json.xz``, ``.json.gz`` or a ``.zip`` holding the JSON file):

* **MultiWOZ 2.1** ``data.json`` style (also ConvLab-2's ``val.json``):
  ``{dialogue_id: {"log": [{"text": ...}, ...], ...}}``. Turns alternate
  user (even index) / system (odd index).
* **MultiWOZ 2.2 / Schema-Guided Dialogue** ``dialogues_*.json`` style (also
  ConvLab-3's unified format): ``[{"dialogue_id", "turns": [{"speaker",
  "utterance"}, ...]}, ...]`` with ``speaker`` in ``USER`` / ``SYSTEM``.
* **CamRest676** (ConvLab-2 release): ``[{"dialogue_id", "dial": [{"usr":
  {"transcript"}, "sys": {"sent"}}, ...]}]``.

Directory layouts understood by :func:`load_dialogues` with ``split=``:

* ``<dir>/{train,dev,test}/dialogues_*.json*`` (MultiWOZ 2.2, SGD);
* ``<dir>/{train,val,test}.json*`` (ConvLab releases, CamRest676, the staged
  MultiWOZ 2.1 validation file);
* ``<dir>/data.json*`` plus ``{val,test}ListFile.txt`` (official MultiWOZ 2.1
  zip layout; ``train`` = all ids not in the val/test lists, or the ids in
  ``trainListFile.txt`` when present). List files may also sit in
  ``<dir>/splits/``.

Formatting: :func:`format_dialogue` renders ``"Person 1: ... Person 2: ..."``
(Person 1 = user, Person 2 = system), and :func:`format_dialogue_with_spans`
also returns the character span of every turn so that loss weights can cover
all tokens or only the replies.

Data location: :func:`resolve_data_dir` (config value, else the environment
variable ``REFORMER_DATA_DIR``, else ``<repo>/../shared/data``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import lzma
import os
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

USER = "user"
SYSTEM = "system"
SPEAKER_LABELS = {USER: "Person 1", SYSTEM: "Person 2"}
TURN_SEPARATOR = " "

DATA_DIR_ENV = "REFORMER_DATA_DIR"

# Canonical split name -> names used on disk by the supported releases.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "val", "dev", "valid"),
    "test": ("test",),
}

_JSON_SUFFIXES = (".json", ".json.xz", ".json.gz", ".zip", ".json.zip")

MULTIWOZ_RAW_BASE = "https://raw.githubusercontent.com/budzianowski/multiwoz/master/data"
MULTIWOZ21_ZIP_URL = "https://github.com/budzianowski/multiwoz/raw/master/data/MultiWOZ_2.1.zip"
# Number of dialogues_NNN.json files per split in budzianowski/multiwoz data/MultiWOZ_2.2.
MULTIWOZ22_FILES_PER_SPLIT = {"train": 17, "dev": 2, "test": 2}
MULTIWOZ21_MEMBERS = ("data.json", "valListFile.txt", "testListFile.txt")


@dataclasses.dataclass
class Dialogue:
    """One dialogue.

    Attributes:
      id: dialogue id without any ``.json`` suffix (e.g. ``"PMUL1635"``).
      turns: ``(speaker, text)`` pairs in order; speaker is :data:`USER` or
        :data:`SYSTEM`; text is stripped and non-empty.
    """

    id: str
    turns: list[tuple[str, str]]


class TurnSpan(NamedTuple):
    """Character span of one turn in the formatted dialogue text.

    ``text[start:end]`` is the whole segment ``"Person k: utterance"``;
    ``text[text_start:end]`` is the utterance alone (without the label).
    """

    speaker: str
    start: int
    text_start: int
    end: int


# --------------------------------------------------------------------------- paths


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the shared data directory.

    Order: the explicit ``data_dir`` (a config value), else ``$REFORMER_DATA_DIR``,
    else ``<repo>/../shared/data`` (the ``shared/data`` folder beside the repo).

    Raises:
      FileNotFoundError: if the chosen directory does not exist.
    """
    if data_dir is not None:
        path, origin = Path(data_dir), "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        repo = Path(__file__).resolve().parents[2]
        path, origin = repo.parent / "shared" / "data", "the default <repo>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Data directory {path} (from {origin}) does not exist. Pass the data "
            f"directory explicitly or set {DATA_DIR_ENV}=/path/to/shared/data."
        )
    return path


def canonical_split(split: str) -> str:
    """Maps ``dev``/``val``/``valid``/``validation`` -> ``validation`` etc.

    Raises:
      ValueError: for an unknown split name.
    """
    for name, aliases in SPLIT_ALIASES.items():
        if split in aliases:
            return name
    known = sorted(a for aliases in SPLIT_ALIASES.values() for a in aliases)
    raise ValueError(f"Unknown split {split!r}; use one of {known}.")


# --------------------------------------------------------------------------- reading


def _strip_json_suffix(name: str) -> str:
    return name[: -len(".json")] if name.endswith(".json") else name


def _read_json(path: Path) -> Any:
    """Reads (possibly compressed) JSON, turning every data problem into ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"Dialogue file {path} does not exist.")
    name = path.name
    try:
        if name.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                raw = f.read()
        elif name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        elif name.endswith(".zip"):
            raw = _read_zip_json(path)
        else:
            raw = path.read_bytes()
    except (lzma.LZMAError, gzip.BadGzipFile, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{path}: cannot decompress ({type(e).__name__}: {e}). The file is "
            "truncated or corrupted; download it again."
        ) from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); is this the right file?") from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}). "
            "The file is truncated or corrupted; download it again."
        ) from e


def _read_zip_json(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        names = [
            n for n in zf.namelist()
            if n.endswith(".json") and not n.startswith("__MACOSX") and not n.endswith("/")
        ]
        data_json = [n for n in names if Path(n).name == "data.json"]
        if len(data_json) == 1:
            member = data_json[0]
        elif len(names) == 1:
            member = names[0]
        else:
            raise ValueError(
                f"{path}: expected one .json member (or a data.json) in the zip, found "
                f"{names or zf.namelist()}. Unzip it and pass the JSON file instead."
            )
        return zf.read(member)


def _schema_error(path: Path, what: str, expected: str) -> ValueError:
    return ValueError(f"{path}: {what}. Expected {expected}; is this a dialogue file of a supported format?")


_FORMAT_21 = "the MultiWOZ 2.1 data.json format {dialogue_id: {'log': [{'text': ...}, ...]}}"
_FORMAT_22 = (
    "the MultiWOZ 2.2 / SGD format [{'dialogue_id': ..., 'turns': "
    "[{'speaker': 'USER'|'SYSTEM', 'utterance': ...}, ...]}, ...]"
)
_FORMAT_CAMREST = "the CamRest676 format [{'dialogue_id': ..., 'dial': [{'usr': {'transcript'}, 'sys': {'sent'}}]}]"


def _parse_multiwoz21(path: Path, data: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    out = []
    for did, dialogue in data.items():
        if not isinstance(dialogue, dict) or "log" not in dialogue:
            keys = sorted(dialogue) if isinstance(dialogue, dict) else type(dialogue).__name__
            raise _schema_error(path, f"dialogue {did!r} has no 'log' key (found {keys})", _FORMAT_21)
        log = dialogue["log"]
        if not isinstance(log, list):
            raise _schema_error(path, f"dialogue {did!r}: 'log' is a {type(log).__name__}, not a list", _FORMAT_21)
        turns = []
        for j, turn in enumerate(log):
            if not isinstance(turn, dict) or "text" not in turn:
                raise _schema_error(path, f"dialogue {did!r} turn {j} has no 'text' key", _FORMAT_21)
            turns.append((USER if j % 2 == 0 else SYSTEM, turn["text"]))
        out.append((_strip_json_suffix(str(did)), turns))
    return out


def _parse_sgd(path: Path, data: list[Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    out = []
    for i, dialogue in enumerate(data):
        if not isinstance(dialogue, dict):
            raise _schema_error(path, f"dialogue #{i} is a {type(dialogue).__name__}, not an object", _FORMAT_22)
        for key in ("dialogue_id", "turns"):
            if key not in dialogue:
                did = dialogue.get("dialogue_id", f"#{i}")
                raise _schema_error(path, f"dialogue {did!r} (#{i} in file) has no {key!r} key", _FORMAT_22)
        did = str(dialogue["dialogue_id"])
        if not isinstance(dialogue["turns"], list):
            raise _schema_error(path, f"dialogue {did!r}: 'turns' is not a list", _FORMAT_22)
        turns = []
        for j, turn in enumerate(dialogue["turns"]):
            for key in ("speaker", "utterance"):
                if not isinstance(turn, dict) or key not in turn:
                    raise _schema_error(path, f"dialogue {did!r} turn {j} has no {key!r} key", _FORMAT_22)
            speaker = str(turn["speaker"]).lower()
            if speaker not in (USER, SYSTEM):
                raise _schema_error(
                    path, f"dialogue {did!r} turn {j} has speaker {turn['speaker']!r}", _FORMAT_22
                )
            turns.append((speaker, turn["utterance"]))
        out.append((_strip_json_suffix(did), turns))
    return out


def _parse_camrest(path: Path, data: list[Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    out = []
    for i, dialogue in enumerate(data):
        if not isinstance(dialogue, dict) or "dial" not in dialogue:
            raise _schema_error(path, f"dialogue #{i} has no 'dial' key", _FORMAT_CAMREST)
        did = str(dialogue.get("dialogue_id", i))
        turns = []
        for j, pair in enumerate(dialogue["dial"]):
            try:
                turns.append((USER, pair["usr"]["transcript"]))
                turns.append((SYSTEM, pair["sys"]["sent"]))
            except (KeyError, TypeError) as e:
                raise _schema_error(
                    path, f"dialogue {did!r} turn pair {j} lacks usr.transcript / sys.sent ({e!r})", _FORMAT_CAMREST
                ) from e
        out.append((did, turns))
    return out


def _parse(path: Path, data: Any) -> list[tuple[str, list[tuple[str, Any]]]]:
    if isinstance(data, dict):
        return _parse_multiwoz21(path, data)
    if isinstance(data, list):
        first = next((d for d in data if isinstance(d, dict)), {})
        if "dial" in first and "turns" not in first:
            return _parse_camrest(path, data)
        return _parse_sgd(path, data)
    raise _schema_error(path, f"top-level JSON is a {type(data).__name__}", f"{_FORMAT_21} or {_FORMAT_22}")


def read_dialogue_file(path: str | os.PathLike[str]) -> list[Dialogue]:
    """Reads one dialogue file (any supported format / compression).

    Empty turns are dropped and dialogues without any non-empty turn are
    skipped; both counts are logged. Nothing is raised for an all-empty file
    here; :func:`load_dialogues` checks the total.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: undecodable / malformed JSON or wrong schema (message names
        the file, the dialogue and the missing key).
    """
    path = Path(path)
    parsed = _parse(path, _read_json(path))
    dialogues, empty_turns, empty_dialogues = [], 0, 0
    for did, raw_turns in parsed:
        turns = []
        for j, (speaker, text) in enumerate(raw_turns):
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}: dialogue {did!r} turn {j} text is a {type(text).__name__}, not a string."
                )
            text = text.strip()
            if text:
                turns.append((speaker, text))
            else:
                empty_turns += 1
        if turns:
            dialogues.append(Dialogue(did, turns))
        else:
            empty_dialogues += 1
    if empty_turns or empty_dialogues:
        logger.warning(
            "%s: dropped %d empty turns and skipped %d dialogues without any text.",
            path, empty_turns, empty_dialogues,
        )
    return dialogues


def _find_json(directory: Path, stem: str) -> Path | None:
    for suffix in _JSON_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _dialogue_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.name.startswith("dialogues_") and p.name.endswith(_JSON_SUFFIXES)
    )


def _read_id_list(path: Path) -> set[str]:
    if path.name.endswith(".json"):
        ids = _read_json(path)
        if not isinstance(ids, list):
            raise ValueError(f"{path}: expected a JSON list of dialogue ids.")
    else:
        ids = path.read_text(encoding="utf-8").split()
    return {_strip_json_suffix(str(i).strip()) for i in ids}


def _find_list_file(directory: Path, split_alias: str) -> Path | None:
    for folder in (directory, directory / "splits"):
        for suffix in (".txt", ".json"):
            candidate = folder / f"{split_alias}ListFile{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _split_files(directory: Path, split: str) -> tuple[list[Path], set[str] | None, set[str]]:
    """Returns (files, keep_ids or None, drop_ids) for a split in ``directory``."""
    aliases = SPLIT_ALIASES[split]
    for alias in aliases:
        sub = directory / alias
        if sub.is_dir():
            files = _dialogue_files(sub)
            if not files:
                raise FileNotFoundError(f"Split folder {sub} has no dialogues_*.json[.xz|.gz] files.")
            return files, None, set()
    for alias in aliases:
        found = _find_json(directory, alias)
        if found is not None:
            return [found], None, set()
    data = _find_json(directory, "data")
    if data is not None:
        list_aliases = {"train": ("train",), "validation": ("val", "valid", "dev"), "test": ("test",)}[split]
        for alias in list_aliases:
            list_file = _find_list_file(directory, alias)
            if list_file is not None:
                return [data], _read_id_list(list_file), set()
        if split == "train":
            held_out = set()
            for alias in ("val", "test"):
                list_file = _find_list_file(directory, alias)
                if list_file is None:
                    raise FileNotFoundError(
                        f"{directory}: found {data.name} but no {alias}ListFile.txt, so the training "
                        "split (all ids not in the val/test lists) cannot be derived. Put the official "
                        "valListFile.txt and testListFile.txt beside data.json."
                    )
                held_out |= _read_id_list(list_file)
            return [data], None, held_out
        raise FileNotFoundError(
            f"{directory}: found {data.name} but no list file for split {split!r} "
            f"(looked for {list_aliases[0]}ListFile.txt here and in splits/)."
        )
    contents = sorted(p.name for p in directory.iterdir())
    hint = ""
    if split == "train" and _find_json(directory, "val") is not None:
        hint = (" This looks like the staged MultiWOZ 2.1 validation-only folder; get the training "
                "split with download_multiwoz(dest_dir) on a networked machine, or use the SGD corpus.")
    raise FileNotFoundError(
        f"No {split!r} split in {directory}: looked for a folder {list(aliases)}, a file "
        f"{aliases[0]}.json[.xz|.gz|.zip], or data.json + list files; found {contents}.{hint}"
    )


def load_dialogues(path_or_dir: str | os.PathLike[str], split: str | None = None) -> list[Dialogue]:
    """Loads dialogues from a file, a split folder, or a dataset folder.

    Args:
      path_or_dir: a dialogue file; a folder of ``dialogues_*.json*`` files; a
        folder holding ``data.json*``; or (with ``split``) a dataset folder in
        one of the layouts in the module docstring.
      split: ``train`` / ``validation`` (``val``, ``dev``) / ``test``. Required
        for dataset folders with per-split subfolders or files; must be None
        when ``path_or_dir`` is a file.

    Returns:
      Dialogues in file order (files sorted by name).

    Raises:
      FileNotFoundError: missing file/folder/split (message says what was
        looked for and what is there).
      ValueError: malformed or wrongly structured data, duplicate ids, or no
        dialogue with any text.
    """
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"Dialogue path {path} does not exist. Set the data path in the config or "
            f"{DATA_DIR_ENV} (see reformer_jax.data.resolve_data_dir)."
        )
    keep: set[str] | None = None
    drop: set[str] = set()
    if path.is_file():
        if split is not None:
            raise ValueError(f"split={split!r} was given but {path} is a single file; pass its folder instead.")
        files = [path]
    elif split is not None:
        files, keep, drop = _split_files(path, canonical_split(split))
    else:
        files = _dialogue_files(path)
        if not files:
            data = _find_json(path, "data")
            if data is None:
                raise FileNotFoundError(
                    f"{path} has no dialogues_*.json* or data.json* files; pass split= "
                    f"(found {sorted(p.name for p in path.iterdir())})."
                )
            files = [data]

    dialogues: list[Dialogue] = []
    seen: dict[str, Path] = {}
    for file in files:
        for dialogue in read_dialogue_file(file):
            if keep is not None and dialogue.id not in keep:
                continue
            if dialogue.id in drop:
                continue
            if dialogue.id in seen:
                raise ValueError(
                    f"Duplicate dialogue id {dialogue.id!r} in {file} (also in {seen[dialogue.id]}); "
                    "remove the duplicate file or pass a single split."
                )
            seen[dialogue.id] = file
            dialogues.append(dialogue)
    if not dialogues:
        where = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
        raise ValueError(
            f"{where}: no dialogue with any non-empty turn"
            + (f" among the ids of split {split!r}" if keep is not None else "")
            + "; check that this is the right file and split."
        )
    logger.info("Loaded %d dialogues from %s%s.", len(dialogues), path, f" [{split}]" if split else "")
    return dialogues


# --------------------------------------------------------------------------- formatting


def format_dialogue_with_spans(dialogue: Dialogue) -> tuple[str, list[TurnSpan]]:
    """Renders ``"Person 1: <user> Person 2: <system> ..."`` with turn spans.

    Returns:
      ``(text, spans)`` with one :class:`TurnSpan` (character offsets into
      ``text``) per turn; consecutive segments are joined by a single space.
    """
    parts: list[str] = []
    spans: list[TurnSpan] = []
    pos = 0
    for i, (speaker, utterance) in enumerate(dialogue.turns):
        if i:
            parts.append(TURN_SEPARATOR)
            pos += len(TURN_SEPARATOR)
        label = f"{SPEAKER_LABELS[speaker]}: "
        segment = label + utterance
        parts.append(segment)
        spans.append(TurnSpan(speaker, pos, pos + len(label), pos + len(segment)))
        pos += len(segment)
    return "".join(parts), spans


def format_dialogue(dialogue: Dialogue) -> str:
    """Returns ``"Person 1: ... Person 2: ..."`` (Person 1 = user, Person 2 = system)."""
    return format_dialogue_with_spans(dialogue)[0]


def iter_turn_segments(dialogues: Iterable[Dialogue]) -> Iterator[str]:
    """Yields every ``"Person k: utterance"`` segment (tokenizer training text)."""
    for dialogue in dialogues:
        for speaker, utterance in dialogue.turns:
            yield f"{SPEAKER_LABELS[speaker]}: {utterance}"


# --------------------------------------------------------------------------- download


def multiwoz_urls(version: str = "2.2") -> list[tuple[str, str]]:
    """Official MultiWOZ release files as ``(url, relative destination path)``.

    ``2.2``: ``MultiWOZ_2.2/{train,dev,test}/dialogues_NNN.json`` (17/2/2 files)
    from github.com/budzianowski/multiwoz ``data/MultiWOZ_2.2``.
    ``2.1``: the single ``MultiWOZ_2.1.zip``.
    """
    if version == "2.2":
        out = []
        for split, count in MULTIWOZ22_FILES_PER_SPLIT.items():
            for k in range(1, count + 1):
                rel = f"MultiWOZ_2.2/{split}/dialogues_{k:03d}.json"
                out.append((f"{MULTIWOZ_RAW_BASE}/{rel}", rel))
        return out
    if version == "2.1":
        return [(MULTIWOZ21_ZIP_URL, "MultiWOZ_2.1.zip")]
    raise ValueError(f"Unknown MultiWOZ version {version!r}; use '2.2' or '2.1'.")


def _fetch(url: str, dest: Path, timeout: float, *, check_json: bool = False) -> None:
    """Downloads ``url`` to ``dest`` atomically (``dest`` appears only when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    logger.info("Downloading %s -> %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    if check_json:
        try:
            _read_json(tmp)
        except ValueError as e:
            tmp.unlink()
            raise ValueError(f"Download of {url} is not valid JSON; try again. ({e})") from e
    os.replace(tmp, dest)


def download_multiwoz(
    dest_dir: str | os.PathLike[str], version: str = "2.2", *, timeout: float = 60.0
) -> Path:
    """Downloads the official MultiWOZ release (needs network; not used in tests).

    Files already present are kept (so a finished download is an offline
    no-op). Each JSON file is parsed after download to catch truncation.

    Returns:
      The dataset folder to pass to :func:`load_dialogues` with ``split=``:
      ``dest_dir/MultiWOZ_2.2`` (``train/dev/test/dialogues_*.json``) or
      ``dest_dir/MultiWOZ_2.1`` (``data.json`` + ``valListFile.txt`` +
      ``testListFile.txt``, extracted from the zip).
    """
    dest = Path(dest_dir)
    if version == "2.2":
        for url, rel in multiwoz_urls("2.2"):
            target = dest / rel
            if not target.is_file():
                _fetch(url, target, timeout, check_json=True)
        return dest / "MultiWOZ_2.2"
    if version == "2.1":
        out = dest / "MultiWOZ_2.1"
        if all((out / m).is_file() for m in MULTIWOZ21_MEMBERS):
            return out
        (url, rel), = multiwoz_urls("2.1")
        archive = dest / rel
        if not archive.is_file():
            _fetch(url, archive, timeout)
        try:
            with zipfile.ZipFile(archive) as zf:
                by_name = {
                    Path(n).name: n for n in zf.namelist()
                    if not n.startswith("__MACOSX") and Path(n).name in MULTIWOZ21_MEMBERS
                }
                missing = [m for m in MULTIWOZ21_MEMBERS if m not in by_name]
                if missing:
                    raise ValueError(f"{archive}: zip lacks {missing}; delete it and download again.")
                out.mkdir(parents=True, exist_ok=True)
                for name, member in by_name.items():
                    (out / name).write_bytes(zf.read(member))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{archive}: not a valid zip ({e}); delete it and download again.") from e
        return out
    raise ValueError(f"Unknown MultiWOZ version {version!r}; use '2.2' or '2.1'.")


def dialogue_stats(dialogues: Sequence[Dialogue]) -> dict[str, int]:
    """Counts: dialogues, turns, user turns, system turns."""
    turns = [s for d in dialogues for s, _ in d.turns]
    return {
        "dialogues": len(dialogues),
        "turns": len(turns),
        "user_turns": turns.count(USER),
        "system_turns": turns.count(SYSTEM),
    }
