"""The default model's training corpus: the Python 3.11 documentation (reST sources), rebuilt
deterministically from Debian 12's `python3.11-doc` package (PSF License Agreement).

    python scripts/default_model_corpus.py --out .corpus      # apt-get download + extract + clean

Writes into --out:
  train.txt    documents separated by a line "\\f" (form feed), ~95% of the files
  heldout.txt  the same for the held-out files (crc32(path) % 20 == 0), never trained on
  chat.jsonl   FAQ question/answer pairs ({"file", "q", "a"}) of the training files, for ChatML turns
  manifest.json  package version, file lists, sha256 of each output
The split is by file, from a hash of its path, so it does not depend on the order files are read.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
HELDOUT_BUCKETS = 20          # 1 in 20 files is held out
DOC_SEP = "\n\f\n"

# Directives whose whole block (line + indented body) is dropped: navigation, markup, no prose.
DROP = {"toctree", "index", "highlight", "image", "figure", "literalinclude", "raw", "only",
        "contents", "tabularcolumns", "sectionauthor", "moduleauthor", "module", "currentmodule",
        "testsetup", "testcleanup", "productionlist", "csv-table", "list-table", "table",
        "include", "role", "default-role", "program", "rubric", "opcode", "audit-event",
        "availability", "sectnum", "cssclass", "centered", "hlist"}
VERSIONED = {"versionadded": "New in version {0}.", "versionchanged": "Changed in version {0}.",
             "deprecated": "Deprecated since version {0}."}
CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")             # comments, labels (.. _x:), substitutions
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'*#+`:.])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|[=\s]*={3,}[=\s]*)\s*$")
_TABLE_ROW = re.compile(r"^\s*[|+].*[|+]\s*$")           # grid-table rows
_FIELD = re.compile(r"^:[\w-]+:(\s|$)")                 # file-level fields (:tocdepth: 2)
_OPTION = re.compile(r"^\s+:[\w-]+:.*$")               # directive options (:noindex:, :synopsis: ...)
_ROLE = re.compile(r":[\w:+-]+:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]+>`_{1,2}")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_SUBST = re.compile(r"\|(version|release)\|")
_INTERP = re.compile(r"`([^`\n]+)`")


def _role_text(m: re.Match) -> str:
    """:func:`~os.path.join` -> join, :ref:`text <label>` -> text, :func:`!x` -> x."""
    s = m.group(1)
    t = re.match(r"(.*?)\s*<[^>]+>$", s, re.S)
    if t and t.group(1):
        return t.group(1)
    s = s.lstrip("!")
    if s.startswith("~"):
        s = s[1:].split(".")[-1]
    return s


def inline(line: str) -> str:
    line = _ROLE.sub(_role_text, line)
    line = _LINK.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _REF.sub(r"\1", line)
    line = _INTERP.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    return _SUBST.sub("3.11", line)


def _indent(s: str) -> int:
    return len(s) - len(s.lstrip())


def clean_lines(lines: list[str]) -> list[str]:
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        d = _DIRECTIVE.match(line)
        if d or _COMMENT.match(line):
            base = _indent(line)
            j = i + 1
            body = []
            while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
                body.append(lines[j])
                j += 1
            name = d.group(2) if d else ""
            if d and name not in DROP:                # keep the body (prose, code) dedented
                arg = inline(d.group(3))
                if name in VERSIONED:                    # as Sphinx renders them
                    ver, _, rest = arg.partition(" ")
                    arg = (VERSIONED[name].format(ver) + " " + rest).strip()
                if arg and name not in CODE:
                    out.append(" " * base + arg)        # a signature, a title, "New in version 3.x."
                body = [b for b in body if not _OPTION.match(b)]
                dedent = min((_indent(b) for b in body if b.strip()), default=base) - base
                body = [b[dedent:] if b.strip() else "" for b in body]
                out.extend(body if name in CODE else clean_lines(body))
            i = j
            continue
        if (_UNDERLINE.match(line) or _TABLE_RULE.match(line) or _TABLE_ROW.match(line)
                or line.strip() == "::" or _FIELD.match(line)):
            i += 1
            continue
        if line.rstrip().endswith("::"):                # "Example::" -> "Example:"
            line = line.rstrip()[:-1]
        out.append(inline(line))
        i += 1
    return out


def clean_rst(text: str) -> str:
    """reST -> plain text: markup removed, prose, literal blocks and doctests kept verbatim."""
    out = clean_lines(text.expandtabs(8).splitlines())
    text = "\n".join(s.rstrip() for s in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def faq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) for each FAQ section whose title ends with '?' (raw reST in)."""
    lines = text.splitlines()
    heads = [k for k in range(len(lines) - 1)
             if lines[k].strip() and _UNDERLINE.match(lines[k + 1])
             and len(lines[k + 1].strip()) >= len(lines[k].strip()) and not _UNDERLINE.match(lines[k])]
    out = []
    for a, b in zip(heads, heads[1:] + [len(lines) + 1]):
        q = inline(lines[a].strip())
        if q.endswith("?"):
            ans = clean_rst("\n".join(lines[a + 2:b - 1])).strip()
            if 40 <= len(ans) <= 3000:
                out.append((q, ans))
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_BUCKETS == 0


def extract(deb: Path | None, work: Path) -> tuple[Path, str]:
    """The _sources folder of the package (downloaded with apt-get when no .deb is given)."""
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True, capture_output=True)
        deb = Path(sorted(glob.glob(str(work / f"{PACKAGE}_*.deb")))[-1])
    version = deb.name.split("_")[1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
    return work / "x" / SOURCES, version


def build(src: Path, out: Path, version: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*.rst.txt"))
    train, held, chat, names = [], [], [], {"train": [], "heldout": []}
    for p in files:
        rel = p.relative_to(src).as_posix()
        if rel.startswith(("includes/", "whatsnew/changelog")) or rel.endswith(("index.rst.txt", "contents.rst.txt")):
            continue
        raw = p.read_text(encoding="utf-8")
        doc = clean_rst(raw)
        if len(doc) < 200:
            continue
        split = "heldout" if is_heldout(rel) else "train"
        (held if split == "heldout" else train).append(doc)
        names[split].append(rel)
        if rel.startswith("faq/") and split == "train":
            chat.extend({"file": rel, "q": q, "a": a} for q, a in faq_pairs(raw))
    (out / "train.txt").write_text(DOC_SEP.join(train), encoding="utf-8")
    (out / "heldout.txt").write_text(DOC_SEP.join(held), encoding="utf-8")
    (out / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat), encoding="utf-8")
    manifest = {"package": f"{PACKAGE} {version} (Debian 12)", "licence": "PSF License Agreement for Python 3.11",
                "files": names, "faq_pairs": len(chat),
                "sha256": {f: hashlib.sha256((out / f).read_bytes()).hexdigest()
                           for f in ("train.txt", "heldout.txt", "chat.jsonl")},
                "bytes": {f: (out / f).stat().st_size for f in ("train.txt", "heldout.txt", "chat.jsonl")}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".corpus"))
    ap.add_argument("--deb", type=Path, default=None, help=f"a downloaded {PACKAGE}_*.deb (default: apt-get download)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, version = extract(args.deb.resolve() if args.deb else None, Path(tmp))
        m = build(src, args.out, version)
    print(json.dumps({k: m[k] for k in ("package", "faq_pairs", "bytes", "sha256")}, indent=1))
    print(f"train files {len(m['files']['train'])}, held-out files {len(m['files']['heldout'])}")


if __name__ == "__main__":
    main()
