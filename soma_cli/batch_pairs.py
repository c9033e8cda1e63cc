"""The pairs of ``soma batch`` (:mod:`soma_cli.batch`): where they come from, their options, and
their state on disk.

Inputs
------
* a manifest CSV with columns ``sar``, ``opt`` (paths, relative ones resolved against the
  manifest's folder), optional ``id`` (default: the SAR file stem) and optional per-row options
  :data:`ROW_OPTIONS` (``reference``, ``method``, ``mode``, ``bands`` as ``"4 3 2"`` or ``"4,3,2"``,
  ``sar_scale``, ``tile_size``, ``overlap``, ``weights``); an empty cell uses the batch-wide value.
  Other columns are ignored (so a dataset's ``pairs.csv`` works as a manifest).
* or two globs, paired by a key: by default the file name without its ``.tif``/``.tiff``
  extension; with ``key_regex`` the regex is searched in the file name and the key is its group
  ``key`` if named, else group 1, else the whole match (e.g. ``(\\d{8})`` pairs by a date).

Resuming
--------
A pair is *done* when ``done.json`` parses and every output it lists exists with the recorded
size; done pairs are skipped. A pair with ``failed.json`` is not run again unless
``retry_failed`` (a corrupt input would only fail again) and still counts as failed. Anything
else (never run, or killed mid-run: outputs without ``done.json``, stray temporary files) is run
again from scratch. ``overwrite`` reruns every pair.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .atomic import read_json
from .errors import ConfigError, InputError, SomaWarning
from .preprocess import parse_bands

ROW_OPTIONS = ("reference", "method", "mode", "bands", "sar_scale", "tile_size", "overlap", "weights")
OUTPUTS = ("aligned.tif", "flow.tif", "tiepoints.gpkg")
DONE = "done.json"
FAILED = "failed.json"
_CHOICES = {"reference": ("opt", "sar"), "mode": ("dense", "affine", "gcps")}
_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_EXTS = (".tif", ".tiff")
_KEY_HINT = "pair them by a shared part of the file name with --key-regex, e.g. --key-regex '_(\\d{8})'"


@dataclass(frozen=True)
class BatchPair:
    """One pair to register: its id (folder name in OUT_DIR), inputs and per-pair options."""

    id: str
    sar: Path
    opt: Path
    options: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def _clean_id(raw: str, where: str) -> str:
    pid = _ID_BAD.sub("_", raw.strip()).strip("_")
    if not pid or pid.startswith("."):
        raise ConfigError(f"{where}: unusable pair id {raw!r}")
    return pid


def check_options(opts: Dict[str, object], where: str) -> Dict[str, object]:
    """Validate and convert option values (``method``, ``mode``, ``reference``, ``bands``, ...)."""
    from .matchers import MATCHERS

    out: Dict[str, object] = {}
    for key, value in opts.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key in _CHOICES:
            value = str(value).strip()
            if value not in _CHOICES[key]:
                raise ConfigError(f"{where}: {key} must be one of {', '.join(_CHOICES[key])}, not {value!r}")
        elif key == "method":
            value = str(value).strip()
            if value not in MATCHERS:
                raise ConfigError(f"{where}: unknown method {value!r}; expected one of {', '.join(MATCHERS)}")
        elif key == "bands":
            value = parse_bands(value) if isinstance(value, str) else tuple(int(b) for b in value)
        elif key in ("tile_size", "overlap"):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{where}: {key} must be an integer, not {value!r}") from None
        elif key == "weights":
            value = Path(value)
        elif key == "sar_scale":
            value = str(value).strip()
        out[key] = value
    return out


def read_manifest(path: Path) -> List[BatchPair]:
    """Read a manifest CSV (see the module docstring). Raises :class:`ConfigError` when malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("sar", "opt") if c not in cols]
    if missing:
        raise ConfigError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has: {', '.join(cols) or 'none'})")
    base = path.parent
    pairs: List[BatchPair] = []
    for i, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        where = f"{path}:{i}"
        if not row.get("sar") or not row.get("opt"):
            raise ConfigError(f"{where}: empty sar or opt path")
        sar, opt = base / row["sar"], base / row["opt"]
        pid = _clean_id(row.get("id") or Path(row["sar"]).stem, where)
        options = check_options({k: row.get(k) for k in ROW_OPTIONS if k in row}, where)
        if "weights" in options and not Path(options["weights"]).is_absolute():
            options["weights"] = base / options["weights"]
        pairs.append(BatchPair(pid, sar, opt, options))
    check_unique(pairs, str(path))
    return pairs


def check_unique(pairs: Sequence[BatchPair], where: str) -> None:
    if not pairs:
        raise ConfigError(f"{where}: no pairs")
    seen: Dict[str, int] = {}
    for p in pairs:
        seen[p.id] = seen.get(p.id, 0) + 1
    dup = sorted(k for k, v in seen.items() if v > 1)
    if dup:
        raise ConfigError(f"{where}: duplicate pair id(s) {', '.join(dup[:5])}; add an 'id' column")


def _key(name: str, regex: Optional[re.Pattern]) -> Optional[str]:
    if regex is None:
        low = name.lower()
        for ext in _EXTS:
            if low.endswith(ext):
                return name[: -len(ext)]
        return Path(name).stem
    m = regex.search(name)
    if not m:
        return None
    if "key" in regex.groupindex:
        return m.group("key")
    return m.group(1) if regex.groups else m.group(0)


def pairs_from_globs(
    sar_glob: str, opt_glob: str, key_regex: Optional[str] = None
) -> Tuple[List[BatchPair], List[Path]]:
    """Pair the files of two globs by key (see the module docstring).

    Returns the pairs (sorted by id) and the files that found no partner (or no key)."""
    try:
        regex = re.compile(key_regex) if key_regex else None
    except re.error as exc:
        raise ConfigError(f"bad --key-regex {key_regex!r}: {exc}") from None
    sides = []
    unmatched: List[Path] = []
    for label, pattern in (("sar", sar_glob), ("opt", opt_glob)):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"--{label}-glob {pattern!r} matches no file")
        keyed: Dict[str, Path] = {}
        for f in files:
            k = _key(f.name, regex)
            if k is None:
                unmatched.append(f)
                continue
            if k in keyed:
                raise ConfigError(f"--{label}-glob: key {k!r} matches both {keyed[k]} and {f}; "
                                  "use --key-regex to tell them apart")
            keyed[k] = f
        sides.append(keyed)
    sars, opts = sides
    for k in sorted(set(sars) ^ set(opts)):
        unmatched.append(sars.get(k) or opts[k])
    pairs = [BatchPair(_clean_id(k, "key"), sars[k], opts[k]) for k in sorted(set(sars) & set(opts))]
    if not pairs:
        raise InputError(f"no SAR/optical files share a key ({len(unmatched)} unmatched file(s)); {_KEY_HINT}")
    check_unique(pairs, "glob pairing")
    return pairs, unmatched


def collect_pairs(manifest: Optional[Path] = None, sar_glob: Optional[str] = None, opt_glob: Optional[str] = None,
                  key_regex: Optional[str] = None) -> List[BatchPair]:
    """The pairs of a manifest, or of two globs (files without a partner: a :class:`SomaWarning`)."""
    if (manifest is None) == (sar_glob is None and opt_glob is None) or (manifest is None and not (sar_glob and opt_glob)):
        raise ConfigError("give either a MANIFEST.csv or both --sar-glob and --opt-glob")
    if manifest is not None:
        return read_manifest(manifest)
    pairs, unmatched = pairs_from_globs(sar_glob, opt_glob, key_regex)
    if unmatched:
        names = ", ".join(p.name for p in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        warnings.warn(SomaWarning(f"{len(unmatched)} file(s) without a partner: {names}"
                                  + ("" if key_regex else f"; {_KEY_HINT}")), stacklevel=2)
    return pairs


# ----------------------------------------------------------------------------- state on disk


def output_sizes(pair_dir: Path) -> Dict[str, int]:
    """Sizes of the pair's products (outputs + QA files), by path relative to ``pair_dir``."""
    sizes = {}
    for name in OUTPUTS:
        p = pair_dir / name
        if p.is_file():
            sizes[name] = p.stat().st_size
    qa = pair_dir / "qa"
    if qa.is_dir():
        for p in sorted(qa.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                sizes[p.relative_to(pair_dir).as_posix()] = p.stat().st_size
    return sizes


def is_done(pair_dir: Path) -> bool:
    """True when ``done.json`` is valid and every output it lists exists with its recorded size."""
    try:
        outputs = read_json(Path(pair_dir) / DONE)["outputs"]
    except (KeyError, TypeError):
        return False
    if not isinstance(outputs, dict) or not all(n in outputs for n in OUTPUTS):
        return False
    for rel, size in outputs.items():
        p = Path(pair_dir) / rel
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def pair_state(pair_dir: Path) -> str:
    """``done``, ``failed`` (``failed.json`` and not done) or ``todo``."""
    if is_done(pair_dir):
        return "done"
    if (Path(pair_dir) / FAILED).is_file():
        return "failed"
    return "todo"
