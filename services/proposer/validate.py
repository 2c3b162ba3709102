"""Checks every variant passes before it is published, whoever proposed it.

Edits apply exactly once; the result compiles; it is not a duplicate of any variant
ever proposed; it stays under a size limit; it leaves the harness alone.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass

from services.contracts import MEASURED_KEYS, knob_values_only, normalize_source, variant_id_for

MAX_SOURCE_BYTES = 200_000

HARNESS_NAMES = ("evaluate_bpb",)


@dataclass(frozen=True)
class Edit:
    old: str
    new: str


def apply_edits(source: str, edits: list[Edit]) -> tuple[str | None, list[str]]:
    """Apply exact-substring edits in order; (new source, []) or (None, reasons)."""
    reasons: list[str] = []
    for i, edit in enumerate(edits, start=1):
        if not edit.old:
            reasons.append(f"edit {i}: `old` is empty; it must be an exact substring")
            continue
        count = source.count(edit.old)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            reasons.append(
                f"edit {i}: `old` {where} in the parent source; it must match exactly once "
                f"(starts with {edit.old[:60]!r})"
            )
            continue
        source = source.replace(edit.old, edit.new, 1)
    return (None, reasons) if reasons else (source, [])


def validate_source(
    source: str,
    *,
    campaign: str,
    known_ids: set[str],
    max_bytes: int = MAX_SOURCE_BYTES,
    filename: str = "train.py",
    parent_source: str | None = None,
) -> list[str]:
    """Reasons the source may not be published; [] when it is fine.

    With a parent, the harness checks look only at the top-level statements the variant
    changed (the parent passed them already): a wave of a 700-line train.py validates in
    milliseconds per variant instead of tens.
    """
    if len(source.encode()) > max_bytes:
        return [f"source is {len(source.encode())} bytes, over the {max_bytes}-byte limit"]
    if parent_source is not None and knob_values_only(source, parent_source):
        # Only numbers on `NAME = number` lines changed: the parent compiled and passed the
        # harness checks, so this does too (no parse: ~30 ms saved on a 700-line train.py).
        if variant_id_for(campaign, source) in known_ids:
            return ["duplicate of a variant already proposed in this campaign"]
        return []
    try:
        tree = ast.parse(source, filename=filename)
        compile(tree, filename, "exec")
    except SyntaxError as exc:
        return [f"does not compile: {exc.msg} at line {exc.lineno}"]
    if variant_id_for(campaign, source) in known_ids:
        return ["duplicate of a variant already proposed in this campaign"]
    statements = (
        tree.body if parent_source is None else _changed_statements(tree, source, parent_source)
    )
    reasons = [r for stmt in statements for r in _harness_violations(stmt)]
    if parent_source is not None:
        reasons.extend(_summary_print_change(source, parent_source))
    return reasons


def _changed_statements(tree: ast.Module, source: str, parent_source: str) -> list[ast.stmt]:
    """Top-level statements of `tree` that differ from the parent's text."""
    matcher = difflib.SequenceMatcher(
        None, parent_source.splitlines(), source.splitlines(), autojunk=False
    )
    changed: set[int] = set()
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        # 1-based lines of the new source; a deletion marks the lines around its place.
        changed.update(range(j1 + 1, j2 + 1) if j2 > j1 else (j1, j1 + 1))
    return [
        stmt
        for stmt in tree.body
        if any(stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno) for line in changed)
    ]


# A string literal that starts with a measured key of the summary block (only the harness,
# through train.py's own final print of the measured values, may print them): where the
# block is printed.
_SUMMARY_SITE = re.compile(r"""[rbfuRBFU]{0,2}(?:'|")\s*(?:""" + "|".join(MEASURED_KEYS) + "):")


def _summary_sites(source: str) -> int:
    return len(_SUMMARY_SITE.findall(source))


def _summary_print_change(source: str, parent_source: str) -> list[str]:
    """A variant may not add places that print summary keys beyond what its parent has."""
    parent_sites = _summary_sites(parent_source)
    sites = _summary_sites(source)
    if sites > parent_sites:
        return [
            f"prints summary keys in {sites} places where its parent has {parent_sites}; "
            "the summary block is the harness's"
        ]
    return []


# A literal measured value: a variant that prints one is faking a result.
_LITERAL_RESULT = re.compile(r"^\s*(" + "|".join(MEASURED_KEYS) + r"):\s*[-+]?\d")


def _harness_violations(tree: ast.AST) -> list[str]:
    reasons: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in HARNESS_NAMES:
            reasons.append(f"redefines the harness function {node.name}() (line {node.lineno})")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in HARNESS_NAMES:
                    reasons.append(f"rebinds the harness name {target.id} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _LITERAL_RESULT.match(node.value)
            if match:
                reasons.append(
                    f"writes a literal result for {match.group(1)!r} (line {node.lineno}); "
                    "only measured values may be reported"
                )
        elif isinstance(node, ast.Call):
            reasons.extend(_file_access_violations(node))
    return reasons


def _file_access_violations(call: ast.Call) -> list[str]:
    """open()/Path() of an absolute path or one leaving the run directory."""
    name = (
        call.func.id
        if isinstance(call.func, ast.Name)
        else (call.func.attr if isinstance(call.func, ast.Attribute) else "")
    )
    if name not in ("open", "Path", "read_text", "read_bytes", "listdir", "scandir"):
        return []
    for arg in call.args[:1]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            path = arg.value
            if path.startswith(("/", "~")) or ".." in path.split("/"):
                return [f"reads a file outside its run directory ({path!r}, line {call.lineno})"]
    return []


def build_variant(
    parent_source: str,
    edits: list[Edit],
    *,
    campaign: str,
    known_ids: set[str],
    max_bytes: int = MAX_SOURCE_BYTES,
    filename: str = "train.py",
) -> tuple[str | None, list[str]]:
    """Apply edits to the parent and check the result: (source, []) or (None, reasons).

    The one check every proposed variant passes, whoever proposed it: the edits apply
    exactly once each, and validate_source finds nothing wrong with the result.
    """
    source, reasons = apply_edits(parent_source, edits)
    if source is None:
        return None, reasons
    if normalize_source(source) == normalize_source(parent_source):
        return None, ["the edits leave the parent unchanged"]
    reasons = validate_source(
        source,
        campaign=campaign,
        known_ids=known_ids,
        max_bytes=max_bytes,
        filename=filename,
        parent_source=parent_source,
    )
    return (None, reasons) if reasons else (source, [])
