"""`pipeline verify`: is this deploy bundle exactly what `pipeline run` wrote, and safe to run?

A bundle arrives from elsewhere (an artifact store, a USB stick), and its infer.py is run,
so nothing in it is trusted until checked, and checking must not itself be an attack surface:

- the manifest is size-capped JSON with a checked schema; a malformed one (bad JSON, a list,
  an entry without sha256, wrong types, another format) is bad input: UserError, exit 2;
- every listed path is relative and stays inside the bundle, and is a regular file: no links
  (not even in a parent folder), devices or FIFOs. Files are lstat-ed before being opened and
  opened with O_NOFOLLOW | O_NONBLOCK, so a FIFO or device never blocks or is read;
- every file's size is capped and must equal the manifest's before its sha256 is computed;
- any file, link or folder not in the manifest fails verification, named: a python module
  planted beside infer.py would be imported by it;
- an archive is unpacked by dskd.data.archive.safe_extract (the datasets' extractor: no
  links, no escaping names, size caps) into a private temp folder that no message names.

Found problems make `ok` false (exit 1 in the CLI); everything is checked, not just the first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from dskd.data.limits import human_bytes
from dskd.errors import UserError
from pipeline.file_kind import describe_mode

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "dskd-bundle/2"
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILE_BYTES = 1 << 30  # an edge classifier's artifacts are MBs; a GiB is a planted file
MAX_TOTAL_BYTES = 4 << 30
MAX_ENTRIES = 10_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fail(label: str, field: str, what: str) -> UserError:
    return UserError(f"{label}: {field}: {what}; not a bundle manifest written by `pipeline run` "
                     "(rebuild the bundle)")


def read_manifest(root: Path, label: str) -> dict[str, Any]:
    """The manifest as a dict with a checked schema, or a one-line UserError naming the field.
    `label` is the bundle as the user named it (folder, or "ARCHIVE: top-folder")."""
    path = root / MANIFEST
    shown = os.path.join(label, MANIFEST)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UserError(f"{label}: no {MANIFEST}; pass a bundle folder (or .tar.gz) written by `pipeline run`") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{shown}: is {describe_mode(st.st_mode)}, not a file; rebuild the bundle")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{shown}: {human_bytes(st.st_size)}, over the {human_bytes(MAX_MANIFEST_BYTES)} cap; "
                        "rebuild the bundle")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{shown}: cannot be read ({exc.__class__.__name__}); rebuild the bundle") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{shown}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}); rebuild the bundle") from None
    check_schema(data, shown)
    return data


def check_schema(m: Any, label: str) -> None:
    """Types and required fields of a dskd-bundle/2 manifest (UserError naming the first bad field)."""
    if not isinstance(m, dict):
        raise _fail(label, "top level", f"is a JSON {type(m).__name__}, expected an object")
    if m.get("format") != BUNDLE_FORMAT:
        raise _fail(label, "format", f"is {m.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for key, typ in (("target", str), ("runtime", str), ("labels", list), ("preprocessing", dict),
                     ("artifacts", list), ("files", dict)):
        if not isinstance(m.get(key), typ):
            raise _fail(label, key, "missing" if key not in m else f"must be a JSON {_json_name(typ)}")
    if not all(isinstance(v, str) for v in m["labels"]):
        raise _fail(label, "labels", "must be a list of strings")
    pre = m["preprocessing"]
    for key in ("input_size", "in_chans"):
        if not isinstance(pre.get(key), int) or isinstance(pre.get(key), bool) or pre[key] < 1:
            raise _fail(label, f"preprocessing.{key}", "must be a positive integer")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not isinstance(v, list) or len(v) != pre["in_chans"] or not all(_is_num(x) for x in v):
            raise _fail(label, f"preprocessing.{key}", "must be a list of in_chans numbers")
        if not all(math.isfinite(x) for x in v) or (key == "std" and not all(x > 0 for x in v)):
            # NaN, inf or std <= 0 make every input the same (or NaN): infer.py would label every image alike
            raise _fail(label, f"preprocessing.{key}", "must be finite" + (" and positive" if key == "std" else ""))
    if len(m["files"]) > MAX_ENTRIES:
        raise _fail(label, "files", f"lists more than {MAX_ENTRIES} files")
    for name, info in m["files"].items():
        where = f"files[{name!r}]"
        if not isinstance(info, dict):
            raise _fail(label, where, "must be an object with sha256 and size_bytes")
        if not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
            raise _fail(label, f"{where}.sha256", "missing" if "sha256" not in info else "must be 64 hex digits")
        size = info.get("size_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(label, f"{where}.size_bytes", "missing" if "size_bytes" not in info
                        else "must be a non-negative integer")
    for i, a in enumerate(m["artifacts"]):
        where = f"artifacts[{i}]"
        if not isinstance(a, dict):
            raise _fail(label, where, "must be an object")
        for key in ("format", "precision", "runtime", "path"):
            if not isinstance(a.get(key), str):
                raise _fail(label, f"{where}.{key}", "missing" if key not in a else "must be a string")
        if not isinstance(a.get("files"), list) or not all(isinstance(f, str) for f in a["files"]):
            raise _fail(label, f"{where}.files", "must be a list of file names")
        build = a.get("build")
        if build is not None and not (isinstance(build, dict) and isinstance(build.get("script"), str)
                                      and isinstance(build.get("inputs"), list)
                                      and all(isinstance(f, str) for f in build["inputs"])):
            raise _fail(label, f"{where}.build", "must be an object with script and inputs")
    if "passed" in m and not isinstance(m["passed"], bool):
        raise _fail(label, "passed", "must be true or false (the run's gate verdict)")
    gates = m.get("gates")
    if gates is not None and not (isinstance(gates, list) and all(
            isinstance(g, dict) and isinstance(g.get("name"), str) and isinstance(g.get("passed"), bool)
            for g in gates)):
        raise _fail(label, "gates", "must be a list of gate rows with a name and passed true/false")


def gate_verdict(m: dict[str, Any]) -> tuple[bool | None, list[str]]:
    """The verdict of the run that wrote the bundle: (passed, the failed gates as name[artifact]).

    passed is None for a manifest that does not record it (bundles from before it was written).
    Why `verify` reads it: "OK" is read as "ship it", and a run that failed its gates still
    writes its bundle (the report links it, so the failure can be inspected)."""
    failed = [f"{g['name']}[{g.get('artifact', '')}]" for g in m.get("gates") or [] if not g["passed"]]
    passed = m.get("passed")
    return (passed if isinstance(passed, bool) else None), failed


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_name(typ: type) -> str:
    return {str: "string", list: "list", dict: "object"}[typ]


def path_problem(rel: str) -> str | None:
    """Why a manifest path is not a plain relative path inside the bundle (None when it is)."""
    if not rel or "\x00" in rel or "\\" in rel:
        return "not a plain relative path"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "an absolute path: it leaves the bundle"
    parts = rel.split("/")
    if ".." in parts:
        return "a '..' path: it leaves the bundle"
    if "" in parts or "." in parts:
        return "not a plain relative path"
    if rel == MANIFEST:
        return "the manifest cannot list itself"
    return None


def check_file(root: Path, rel: str, info: dict[str, Any]) -> str | None:
    """Problem with one listed file, or None when its size and sha256 match. Never follows a
    link, never opens anything but a regular file, never reads past the cap."""
    why = path_problem(rel)
    if why:
        return f"{rel}: {why}"
    parts = rel.split("/")
    cur = root
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as exc:
            return f"{rel}: cannot be read ({exc.strerror})"
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{rel}: its folder {'/'.join(parts[:i + 1])} is {describe_mode(st.st_mode)}"
        if last and not stat.S_ISREG(st.st_mode):
            return f"{rel}: is {describe_mode(st.st_mode)}; only regular files may be in a bundle"
    if st.st_size > MAX_FILE_BYTES:
        return f"{rel}: {human_bytes(st.st_size)}, over the {human_bytes(MAX_FILE_BYTES)} per-file cap"
    if st.st_size != info["size_bytes"]:
        return f"{rel}: sha256 differs from the manifest (not hashed: {st.st_size} bytes, the manifest says {info['size_bytes']})"
    try:
        fd = os.open(cur, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        return f"{rel}: {'is a symbolic link' if exc.errno == errno.ELOOP else 'cannot be opened'}"
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped after the lstat
            return f"{rel}: changed into a special file while being checked"
        h, left = hashlib.sha256(), info["size_bytes"] + 1
        while left > 0 and (block := fh.read(min(1 << 20, left))):
            h.update(block)
            left -= len(block)
    if h.hexdigest() != info["sha256"]:
        return f"{rel}: sha256 differs from the manifest"
    return None


def unlisted(root: Path, listed: set[str], prefix: str = "") -> list[str]:
    """Entries under `root` (links and special files included, folders without listed files
    too) that the manifest does not list, as relative names. Links are never followed."""
    folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    found: list[str] = []
    count = 0

    def walk(d: Path, rel: str) -> None:
        nonlocal count
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                count += 1
                if count > MAX_ENTRIES:
                    raise UserError(f"the bundle holds more than {MAX_ENTRIES} entries; not a bundle")
                name = f"{rel}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    if name in folders:
                        walk(Path(e.path), name + "/")
                    else:
                        found.append(prefix + name + "/")
                elif name not in listed and name != MANIFEST:
                    found.append(prefix + name)

    walk(root, "")
    return found


RUNNABLE = ("infer.py",)  # what runs a bundle: every one `pipeline run` writes has it (pipeline/bundle.py)


def _runnable_problems(m: dict[str, Any]) -> list[str]:
    """A bundle whose every file matches can still be one that cannot run: its manifest (and
    folder) without infer.py, without a single artifact, or an artifact without a companion its
    runtime needs (an OpenVINO .xml without its .bin: listed in neither). Each verified OK
    before; now each is a named problem, since `verify` OK is read as "ship it"."""
    out = [f"{name}: not in the manifest; every bundle `pipeline run` writes has it (rebuild the bundle)"
           for name in RUNNABLE if name not in m["files"]]
    from export.formats import FORMATS

    for i, a in enumerate(m["artifacts"]):
        spec = FORMATS.get(a["format"])
        if spec is None or a.get("build") or path_problem(a["path"]):  # other formats: their own rules
            continue
        main = Path(a["path"])
        for c in spec.companion_paths(main, needed_to_run_only=True):
            rel = c.as_posix()
            if rel not in m["files"] or rel not in a["files"]:
                out.append(f"artifacts[{i}] ({a['format']}): {rel} is not in the manifest, and the runtime "
                           f"needs it beside {a['path']} (rebuild the bundle)")
    if m["artifacts"] and not any(a["runtime"] == m["runtime"] for a in m["artifacts"]):
        out.append(f"artifacts: none runs on the bundle's runtime {m['runtime']!r}; infer.py runs only those "
                   "(rebuild the bundle)")
    if not m["artifacts"]:
        out.append("artifacts: none listed; infer.py has nothing to run (rebuild the bundle from a run "
                   "that shipped an artifact)")
    return out


def _consistency_problems(root: Path, m: dict[str, Any], bad_files: set[str]) -> list[str]:
    """Parts of the manifest that must agree with each other and with the model: an artifact's own
    sha256 with its file's (a model swapped in with only `files` re-hashed verified OK), and for an
    intact ONNX model its input (C, H, W) with `preprocessing` and its output width with `labels` (a
    swapped model then crashed infer.py, or named classes from the wrong list). The manifest is
    not signed: this catches inconsistency, not a consistent forgery."""
    out = []
    pre, labels = m["preprocessing"], m["labels"]
    for i, a in enumerate(m["artifacts"]):
        listed = m["files"].get(a["path"])
        if isinstance(a.get("sha256"), str) and listed is not None and a["sha256"] != listed["sha256"]:
            out.append(f"artifacts[{i}] ({a['format']}): its sha256 is not that of {a['path']} in files; the model "
                       "was replaced (rebuild the bundle)")
            continue
        if listed is None or not a["path"].endswith(".onnx") or a["path"] in bad_files:
            continue  # a file that failed its own check (size, sha256, a link) is never opened
        shapes = _onnx_io_shapes(root / a["path"])
        if shapes is None:
            continue
        (inp, outp) = shapes
        want = [pre["in_chans"], pre["input_size"], pre["input_size"]]
        if len(inp) == 4 and all(isinstance(d, int) and d > 0 for d in inp[1:]) and list(inp[1:]) != want:
            out.append(f"artifacts[{i}] ({a['format']}): the model takes C×H×W {'×'.join(map(str, inp[1:]))}, the "
                       f"manifest's preprocessing gives {'×'.join(map(str, want))} (rebuild the bundle)")
        if len(outp) == 2 and isinstance(outp[1], int) and outp[1] > 0 and outp[1] != len(labels):
            out.append(f"artifacts[{i}] ({a['format']}): the model has {outp[1]} outputs, the manifest "
                       f"{len(labels)} labels (rebuild the bundle)")
    return out


def _onnx_io_shapes(path: Path) -> tuple[list[Any], list[Any]] | None:
    """(input dims, output dims) of an ONNX model's first input and output, graph only (None when onnx
    is not installed or the file does not parse: the sha256 check and infer.py speak for it then)."""
    try:
        from export.onnx_inspect import onnx_io

        io = onnx_io(path, external_data=False)
        return io["inputs"][0]["shape"], io["outputs"][0]["shape"]
    except Exception:  # noqa: BLE001 - any parse failure: not this check's business
        return None


def _check_folder(root: Path, label: str, prefix: str = "") -> tuple[int, list[str], dict[str, Any]]:
    m = read_manifest(root, label)
    files: dict[str, Any] = m["files"]
    file_problems = {rel: p for rel, info in files.items() if (p := check_file(root, rel, info))}
    problems = list(file_problems.values())
    total = sum(int(i["size_bytes"]) for i in files.values())
    if total > MAX_TOTAL_BYTES:
        problems.append(f"the files add up to {human_bytes(total)}, over the {human_bytes(MAX_TOTAL_BYTES)} cap")
    for i, a in enumerate(m["artifacts"]):
        needed = list(a["files"]) + ([a["build"]["script"], *a["build"]["inputs"]] if a.get("build") else [a["path"]])
        problems += [f"artifacts[{i}] ({a['format']}): {n} is not in the manifest's files"
                     for n in dict.fromkeys(needed) if n not in files]
    problems += _runnable_problems(m)
    problems += _consistency_problems(root, m, set(file_problems))
    problems = [f"{prefix}{p}" for p in problems]
    problems += [f"{u}: not in the manifest; remove it (infer.py could import or run it) or rebuild the bundle"
                 for u in unlisted(root, set(files), prefix)]
    return len(files), problems, m


def verify_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Check a bundle folder or its archive; -> {bundle, files, problems, ok, gates_passed, failed_gates}.

    `ok` is the files' integrity; `gates_passed` the recorded verdict of the run that wrote the
    bundle (None when not recorded): `pipeline verify` fails on either.

    `bundle` is the path as given (never the temp folder an archive is unpacked into);
    files the manifest does not list are among `problems`.
    Raises UserError (exit 2) for a missing path or a malformed archive or manifest.
    """
    p = Path(path)
    shown = os.fspath(path)
    try:
        st = os.lstat(p)
    except OSError:
        raise UserError(f"{shown}: no such bundle; pass RUN/bundle/<target> or its .tar.gz") from None
    if stat.S_ISDIR(st.st_mode):
        n, problems, m = _check_folder(p, shown)
    elif stat.S_ISREG(st.st_mode):
        n, problems, m = _check_archive(p, shown)
    else:
        raise UserError(f"{shown}: is {describe_mode(st.st_mode)}; pass a bundle folder or its .tar.gz")
    passed, failed = gate_verdict(m)
    return {"bundle": shown, "files": n, "problems": problems, "ok": not problems,
            "gates_passed": passed, "failed_gates": failed}


def _check_archive(p: Path, shown: str) -> tuple[int, list[str], dict[str, Any]]:
    from dskd.data.archive import archive_kind, safe_extract
    from dskd.data.limits import ByteCaps

    if archive_kind(p) is None:
        raise UserError(f"{shown}: not a bundle archive (.tar.gz, .tar or .zip) nor a folder")
    caps = ByteCaps(MAX_FILE_BYTES, MAX_TOTAL_BYTES, "bundle file cap", "bundle total cap")
    with tempfile.TemporaryDirectory(prefix="dskd-verify-") as td:
        root = Path(td) / "x"
        safe_extract(p, root, caps=caps)
        if (root / MANIFEST).exists():
            return _check_folder(root, shown)
        tops = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink()
                      and (d / MANIFEST).exists())
        if not tops:
            raise UserError(f"{shown}: the archive holds no {MANIFEST}; is it a bundle written by `pipeline run`?")
        if len(tops) > 1:
            raise UserError(f"{shown}: the archive holds {len(tops)} bundles ({', '.join(tops)}); pack one per archive")
        n, problems, m = _check_folder(root / tops[0], f"{shown}: {tops[0]}", prefix=f"{tops[0]}/")
        problems += [f"{u}: not in the manifest; remove it or rebuild the bundle"
                     for u in unlisted(root, set(), "") if u != f"{tops[0]}/"]
        return n, problems, m
