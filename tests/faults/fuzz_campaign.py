"""Fuzz campaign: malformed task definitions through the real ``loraflow`` entry point.

Every generated document is *known* to be invalid, by construction and by an oracle
independent of the code under test (a leaf value is only used if a JSON Schema validator
of that leaf alone refuses it; a syntax break only if ``json.loads`` refuses the text). It
is written to a file and given to ``flows.cli.main(["validate", file])``, the function the
``loraflow`` console script calls, with stdout and stderr captured. Each must be refused:

* exit code 2, nothing on stdout, no traceback, and no exception escaping ``main``;
* stderr is ``error: <file>: N problem(s)`` followed by one ``  <pointer>: <message>`` line
  per problem, where ``<pointer>`` is ``(document)`` or an RFC 6901 JSON pointer;
* one of the pointers is the place that was damaged (or an ancestor or descendant of it).

Kinds of damage (``KINDS``): wrong-typed or out-of-range values for every field of the
schema, unknown keys (typos, odd characters), missing required keys, sections replaced by
non-objects, cross-field contradictions, unknown versions, broken JSON syntax (truncation,
trailing commas, comments, single quotes, NaN/Infinity, duplicate keys, raw control
characters), invalid UTF-8, non-object documents, nesting too deep for the parser or just
below its limit, integers with more digits than Python converts, numbers that overflow to
infinity, huge strings.

    python tests/faults/fuzz_campaign.py --n 10000 [--seed 1] [--json summary.json]

Why one module over 400 lines: a campaign is one program (mutators, runner, summary)
that runs standalone; its parts mean nothing apart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import random
import re
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jsonschema  # noqa: E402

from engine.task.validation import MAX_DOCUMENT_BYTES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "engine" / "task" / "schema" / "finetune-task.schema.json"
BASE_DOCUMENTS = [
    ROOT / "examples" / "quickstart.json",
    ROOT / "examples" / "sd15-naruto.json",
    ROOT / "examples" / "sdxl-base.json",
    ROOT / "tests" / "data" / "crynux" / "crynux-sd15-example.json",
    ROOT / "tests" / "data" / "crynux" / "crynux-minimal.json",
]
#: "  <pointer>: <message>"; generated keys never hold ":", so a segment stops at one
PROBLEM_LINE = re.compile(r"^  (\(document\)|(?:/[^/:\n]*)+): \S.*$")
ODD_KEY_CHARS = "/~ \t\"\\é€🙂"


@dataclass
class Case:
    kind: str
    data: bytes
    pointer: str | None  # the damaged place; "" for the whole document; None: any
    #: pointer with "/" or "~" in a key: checks RFC 6901 escaping ("~0", "~1")
    escaped_key: bool = False


# -- the schema, as a list of fields --------------------------------------------------------


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        return schema()["$defs"][ref.rsplit("/", 1)[-1]]
    return node


def _object_schema(node: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema inside ``node`` (direct, by $ref, or as the non-null anyOf)."""
    node = _resolve(node)
    if "properties" in node:
        return node
    for option in node.get("anyOf", []):
        option = _resolve(option)
        if "properties" in option:
            return option
    return None


@dataclass(frozen=True)
class Field:
    path: tuple[str, ...]
    schema: dict[str, Any]
    parent: dict[str, Any]  # the object schema holding it


@lru_cache(maxsize=1)
def fields() -> list[Field]:
    """Every property of the task schema, nested objects included, in schema order."""
    found: list[Field] = []

    def walk(obj: dict[str, Any], path: tuple[str, ...]) -> None:
        for name, sub in obj.get("properties", {}).items():
            found.append(Field((*path, name), sub, obj))
            inner = _object_schema(sub)
            if inner is not None:
                walk(inner, (*path, name))

    walk(schema(), ())
    return found


@cache
def _leaf_validator(path: tuple[str, ...]) -> jsonschema.Validator:
    node = next(f.schema for f in fields() if f.path == path)
    return jsonschema.Draft202012Validator({**node, "$defs": schema()["$defs"]})


def pointer(path: tuple[str, ...] | list[str]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


# -- building damaged documents -----------------------------------------------------------


@lru_cache(maxsize=1)
def base_documents() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in BASE_DOCUMENTS if p.exists()]


def _base(rng: random.Random) -> dict[str, Any]:
    return copy.deepcopy(rng.choice(base_documents()))


def _container(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The object holding ``path[-1]``, creating (or replacing) objects on the way."""
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    return node


def _random_text(rng: random.Random, size: int) -> str:
    alphabet = string.ascii_letters + string.digits + " _-./~é€🙂\u200b"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _candidate_values(rng: random.Random) -> list[Any]:
    return [
        None, True, False, 0, -1, 1, -(10**6), 10**18, 1.5, -0.5, 0.0, 1e300, -1e-300,
        "", " ", "1", "true", "null", _random_text(rng, rng.randint(1, 12)), [], [1], ["a"],
        {}, {"x": 1}, [[]], {"": None},
    ]


def _bad_value(rng: random.Random, f: Field) -> Any | None:
    """A value the field's own schema refuses, or None if none was found."""
    validator = _leaf_validator(f.path)
    candidates = _candidate_values(rng)
    rng.shuffle(candidates)
    for value in candidates:
        if not validator.is_valid(value):
            return value
    return None


def _dumps(doc: Any, rng: random.Random) -> bytes:
    indent = rng.choice([None, 2])
    return json.dumps(doc, indent=indent, ensure_ascii=rng.random() < 0.5).encode("utf-8")


def wrong_value(rng: random.Random) -> Case:
    doc = _base(rng)
    while True:
        f = rng.choice(fields())
        value = _bad_value(rng, f)
        if value is not None:
            break
    _container(doc, f.path)[f.path[-1]] = value
    return Case("wrong-value", _dumps(doc, rng), pointer(f.path))


def _typo(rng: random.Random, word: str) -> str:
    chars = list(word)
    i = rng.randrange(len(chars))
    op = rng.choice(["drop", "swap", "double", "case"])
    if op == "drop" and len(chars) > 1:
        del chars[i]
    elif op == "swap" and len(chars) > 1:
        j = min(i + 1, len(chars) - 1)
        chars[i], chars[j] = chars[j], chars[i]
        if chars == list(word):
            chars.append("x")
    elif op == "double":
        chars.insert(i, chars[i])
    else:
        chars[i] = chars[i].swapcase() if chars[i].isalpha() else "Z"
    return "".join(chars)


def _object_paths() -> list[tuple[str, ...]]:
    return [(), *[f.path for f in fields() if _object_schema(f.schema) is not None]]


def _properties_at(path: tuple[str, ...]) -> dict[str, Any]:
    if not path:
        return schema()["properties"]
    node = next(f.schema for f in fields() if f.path == path)
    inner = _object_schema(node)
    return inner["properties"] if inner else {}


def unknown_key(rng: random.Random, *, odd_characters: bool = True) -> Case:
    doc = _base(rng)
    path = rng.choice(_object_paths())
    known = list(_properties_at(path))
    if rng.random() < 0.6 and known:
        key = _typo(rng, rng.choice(known))
    else:
        key = _random_text(rng, rng.randint(1, 16))
    if odd_characters and rng.random() < 0.3:
        key = key + rng.choice(ODD_KEY_CHARS)
    if not odd_characters:
        key = key.replace("/", "_").replace("~", "_")
    if key in known or not key:
        key = key + "_bogus"
    escaped = "/" in key or "~" in key
    _container(doc, (*path, key))[key] = rng.choice(_candidate_values(rng))
    return Case("unknown-key", _dumps(doc, rng), pointer((*path, key)), escaped_key=escaped)


def missing_required(rng: random.Random) -> Case:
    doc = _base(rng)
    options: list[tuple[str, ...]] = [(k,) for k in schema().get("required", [])]
    for f in fields():
        inner = _object_schema(f.schema)
        if inner is not None and f.path[0] in doc:
            options += [(*f.path, k) for k in inner.get("required", [])]
    path = rng.choice(options)
    holder = _container(doc, path)
    holder.pop(path[-1], None)
    return Case("missing-required", _dumps(doc, rng), pointer(path))


def section_not_object(rng: random.Random) -> Case:
    doc = _base(rng)
    path = rng.choice([p for p in _object_paths() if p])
    value = rng.choice([[], [1, 2], "text", 3, 2.5, True, None])
    validator = _leaf_validator(path)
    if validator.is_valid(value):  # null is allowed for optional sections
        value = "not an object"
    _container(doc, path)[path[-1]] = value
    return Case("section-not-object", _dumps(doc, rng), pointer(path))


CROSS_FIELD: list[tuple[dict[str, Any], str]] = [
    ({"dataset": {"name": "d", "url": "https://x/y.zip"}}, "/dataset"),
    ({"dataset": {}}, "/dataset"),
    ({"dataset": {"url": "not a url"}}, "/dataset/url"),
    ({"dataset": {"name": "d", "caption_column": "image"}}, "/dataset/caption_column"),
    ({"train_args": {"num_train_steps": 10, "max_train_steps": 5}}, "/train_args/num_train_steps"),
    ({"train_args": {"resolution": 100}}, "/train_args/resolution"),
    ({"train_args": {"max_train_steps": 10, "num_train_steps": 2,
                     "lr_scheduler": {"lr_scheduler": "cosine", "lr_warmup_steps": 50}}},
     "/train_args/lr_scheduler/lr_warmup_steps"),
    ({"lora": {"target_modules": "to_q("}}, "/lora/target_modules"),
    ({"lora": {"target_modules": []}}, "/lora/target_modules"),
    ({"lora": {"init_lora_weights": "loftq"}}, "/lora/init_lora_weights"),
    ({"model": {"name": "v1-5-pruned.safetensors"}}, "/model/name"),
    ({"validation": {"prompt": "  "}}, "/validation/prompt"),
    ({"version": "9.9.9"}, "/version"),
]


def cross_field(rng: random.Random) -> Case:
    doc = _base(rng)
    changes, where = rng.choice(CROSS_FIELD)
    for section, value in changes.items():
        if isinstance(value, dict):
            target = doc.setdefault(section, {})
            if section == "dataset":
                target.clear()
            if section == "train_args" and "num_train_steps" not in value:
                target.pop("num_train_steps", None)
            target.update(copy.deepcopy(value))
        else:
            doc[section] = value
    return Case("cross-field", _dumps(doc, rng), where)


def broken_syntax(rng: random.Random) -> Case:
    text = _dumps(_base(rng), rng).decode()
    kind = rng.choice(["truncate", "trailing-comma", "comment", "single-quotes", "nan",
                       "infinity", "duplicate-key", "control-char", "garbage-tail", "bare"])
    if kind == "truncate":
        broken = text[: rng.randrange(1, len(text) - 1)]
    elif kind == "trailing-comma":
        i = text.rfind("}")
        broken = text[:i] + "," + text[i:]
    elif kind == "comment":
        broken = "// task\n" + text
    elif kind == "single-quotes":
        broken = text.replace('"', "'", 2)
    elif kind == "nan":
        broken = text[:-1].rstrip() + ', "seed": NaN}'
    elif kind == "infinity":
        broken = text[:-1].rstrip() + ', "noise": -Infinity}'
    elif kind == "duplicate-key":
        broken = text[:-1].rstrip() + ', "seed": 1, "seed": 2}'
    elif kind == "control-char":
        broken = text.replace('"', '"\x01', 1)
    elif kind == "garbage-tail":
        broken = text + rng.choice(["x", "}", "[]", "\x00"])
    else:
        broken = text.strip("{}")
    try:
        json.loads(broken)
    except ValueError:
        return Case(f"syntax-{kind}", broken.encode("utf-8", "surrogatepass"), "")
    return Case("syntax-truncate", text[: len(text) // 2].encode(), "")


def not_an_object(rng: random.Random) -> Case:
    text = rng.choice(["[]", "[{}]", '"task"', "3", "-0.5", "null", "true", '""', " ", "",
                       "\ufeff", "\n\n"])
    return Case("not-an-object", text.encode(), "")


def bad_encoding(rng: random.Random) -> Case:
    data = bytearray(_dumps(_base(rng), rng))
    i = rng.randrange(len(data))
    data[i:i] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])
    return Case("bad-encoding", bytes(data), "")


def too_deep(rng: random.Random) -> Case:
    depth = rng.choice([rng.randint(100_000, 300_000), rng.randint(900, 990)])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    nested = opener * depth + "1" + closer * depth
    doc = _dumps(_base(rng), rng).decode()
    place = rng.choice(["top", "field"])
    if place == "top" and depth > 5000:
        return Case("too-deep", nested.encode(), "")
    text = doc[:-1].rstrip() + f', "deep_bogus": {nested}' + "}"
    # too deep for the parser: a document-level refusal; just parseable (or not, with
    # the interpreter's own stack in use): "(document)" or the field, either is right
    return Case("too-deep", text.encode(), "" if depth > 5000 else None)


def huge_number(rng: random.Random) -> Case:
    doc = _dumps(_base(rng), rng).decode()
    digits = "9" * rng.randint(4400, 20_000)
    number = rng.choice([digits, "1e400", "-1e999", "1" + "0" * 400 + ".5"])
    if rng.random() < 0.5:
        key = "seed"
        doc = doc.replace('"seed":', '"seed_old":', 1)
    else:
        key = "overflow_bogus"
    text = doc[:-1].rstrip() + f', "{key}": {number}' + "}"
    # more digits than int() converts: a parse error; a float overflowing: the field
    return Case("huge-number", text.encode(), "" if number == digits else f"/{key}")


def huge_string(rng: random.Random) -> Case:
    doc = _base(rng)
    size = rng.choice([10_000, 200_000, 2_000_000])
    target = rng.choice([("model", "revision"), ("validation", "prompt"), ("bogus",)])
    _container(doc, target)[target[-1]] = "x" * size + "\x00"
    expected = "/bogus"
    if target == ("model", "revision"):
        doc["model"]["name"] = 7  # make sure it is refused
        expected = "/model/name"
    elif target == ("validation", "prompt"):
        doc["validation"]["num_images"] = -3
        expected = "/validation/num_images"
    data = _dumps(doc, rng)
    return Case("huge-string", data, "" if len(data) > MAX_DOCUMENT_BYTES else expected)


KINDS: dict[str, Callable[[random.Random], Case]] = {
    "wrong-value": wrong_value,
    "unknown-key": unknown_key,
    "missing-required": missing_required,
    "section-not-object": section_not_object,
    "cross-field": cross_field,
    "syntax": broken_syntax,
    "not-an-object": not_an_object,
    "bad-encoding": bad_encoding,
    "too-deep": too_deep,
    "huge-number": huge_number,
    "huge-string": huge_string,
}
STACKABLE = frozenset({"wrong-value", "unknown-key", "missing-required", "section-not-object"})
WEIGHTS = {"wrong-value": 30, "unknown-key": 12, "missing-required": 8, "section-not-object": 6,
           "cross-field": 8, "syntax": 14, "not-an-object": 3, "bad-encoding": 5,
           "too-deep": 4, "huge-number": 5, "huge-string": 5}


def malformed_case(rng: random.Random, *, odd_key_characters: bool = True) -> Case:
    """One damaged task document (1-3 damages on top of each other, the first one named)."""
    kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    if kind == "unknown-key":
        case = unknown_key(rng, odd_characters=odd_key_characters)
    else:
        case = KINDS[kind](rng)
    if case.kind in STACKABLE and case.pointer and rng.random() < 0.3:
        # a second, independent schema damage: both must be listed (cross-field rules and
        # parse errors are left alone: they are only checked on an otherwise valid document)
        doc = json.loads(case.data)
        f = rng.choice(fields())
        value = _bad_value(rng, f)
        second = pointer(f.path)
        overlaps = _escape_ok(case.pointer, [second]) or case.pointer.startswith(second)
        if value is not None and not overlaps and isinstance(doc.get(f.path[0]), dict):
            _container(doc, f.path)[f.path[-1]] = value
            case = Case(case.kind, _dumps(doc, rng), case.pointer, case.escaped_key)
    return case


def cases(n: int, seed: int, *, odd_key_characters: bool = True) -> Iterator[Case]:
    rng = random.Random(seed)
    for _ in range(n):
        yield malformed_case(rng, odd_key_characters=odd_key_characters)


# -- feeding them to the CLI --------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    problem: str  # "" when ok
    exit_code: int | None
    pointers: list[str]


def _escape_ok(expected: str, pointers: list[str]) -> bool:
    return any(p == expected or expected.startswith(p + "/") or p.startswith(expected + "/")
               for p in pointers)


def check_refusal(case: Case, exit_code: int | None, stdout: str, stderr: str,
                  escaped: Exception | None = None) -> Outcome:
    """Whether one CLI run refused ``case`` the way the module docstring says."""
    if escaped is not None:
        return Outcome(False, f"exception escaped main: {type(escaped).__name__}: {escaped}",
                       exit_code, [])
    lines = stderr.splitlines()
    pointers = []
    for line in lines[1:]:
        match = PROBLEM_LINE.match(line)
        if match:
            pointers.append("" if match.group(1) == "(document)" else match.group(1))
    if "Traceback" in stderr:
        return Outcome(False, "traceback on stderr", exit_code, pointers)
    if exit_code != 2:
        return Outcome(False, f"exit code {exit_code}, expected 2", exit_code, pointers)
    if stdout:
        return Outcome(False, "output on stdout", exit_code, pointers)
    if not lines or not re.match(r"^error: .*: \d+ problem\(s\)$", lines[0]):
        return Outcome(False, f"first line is not 'error: ...: N problem(s)': {lines[:1]}",
                       exit_code, pointers)
    bad = [line for line in lines[1:] if not PROBLEM_LINE.match(line)]
    if bad or len(pointers) != int(lines[0].rsplit(": ", 1)[1].split()[0]):
        return Outcome(False, f"problem lines not '<pointer>: <message>': {bad[:2]}",
                       exit_code, pointers)
    if case.pointer is not None and not _escape_ok(case.pointer, pointers):
        why = "pointer-not-escaped" if case.escaped_key else "damaged place not reported"
        return Outcome(False, f"{why}: expected {case.pointer!r}, got {pointers[:5]}",
                       exit_code, pointers)
    return Outcome(True, "", exit_code, pointers)


def run_in_process(case: Case, path: Path) -> Outcome:
    """Feed one case to ``flows.cli.main(["validate", path])``, capturing its output."""
    from flows.cli import main

    path.write_bytes(case.data)
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["validate", str(path)])
        except BaseException as exc:  # noqa: BLE001 - that is what we look for
            escaped = exc
    return check_refusal(case, code, out.getvalue(), err.getvalue(), escaped)


@dataclass
class FuzzResult:
    seed: int
    inputs_tried: int = 0
    refused_correctly: int = 0
    failures: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def run_fuzz(n: int, seed: int, work: Path, *, odd_key_characters: bool = True,
             keep_examples: int = 20) -> FuzzResult:
    """Generate ``n`` malformed documents and feed each to the CLI in this process."""
    result = FuzzResult(seed=seed)
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    t0 = time.monotonic()
    path = work / "task.json"
    for case in cases(n, seed, odd_key_characters=odd_key_characters):
        outcome = run_in_process(case, path)
        result.inputs_tried += 1
        kinds[case.kind] += 1
        if outcome.ok:
            result.refused_correctly += 1
            continue
        result.failures += 1
        reasons[outcome.problem.split(":")[0]] += 1
        if len(result.examples) < keep_examples:
            result.examples.append({"kind": case.kind, "problem": outcome.problem,
                                    "document": case.data[:300].decode("utf-8", "replace")})
    result.by_kind = dict(sorted(kinds.items()))
    result.failures_by_reason = dict(reasons)
    result.seconds = round(time.monotonic() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="documents to generate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraflow-fuzz-") as work:
        result = run_fuzz(args.n, args.seed, Path(work))
    summary = json.dumps(asdict(result), sort_keys=True)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2, sort_keys=True))
    print(summary)
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
