"""The few values a VOC annotation carries, read exactly as ElementTree would, but fast.

Converting tens of thousands of annotations is dominated by XML parsing, and files of
one dataset almost always share their *skeleton*: the same declaration and tags in the
same order, only the text between them differs. :class:`FieldReader` parses the first
file of each skeleton with ElementTree, learns which text holds each field, checks that
this plan reproduces ElementTree's answer on that file, and compiles the skeleton into
one regular expression: the declaration and tags literally, a capture for each field's
text. A later file that matches it is read with that one match.

That is exact, not a heuristic. A matching file has byte-for-byte the learned markup,
text between the tags that holds no ``<``, no ``&`` (so no entity, comment, CDATA or
processing instruction) and no character XML forbids, field texts without a carriage
return (which ElementTree would normalise), and nothing but white space around the
root; text cannot change the structure of such a document, so ElementTree would read
the same tree. Everything else, malformed files included, goes through ElementTree,
whose message is reported.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import NamedTuple

_COORDINATES = ("xmin", "ymin", "xmax", "ymax")
_FIELDS_OF = {
    # (depth, parent path) -> {tag: position in the flat field list}; the first match wins, as findtext
    (2, ()): {"filename": 0},
    (3, ("size",)): {"width": 1, "height": 2},
    (3, ("object",)): {"name": 0, "difficult": 1},
    (4, ("object", "bndbox")): {"xmin": 2, "ymin": 3, "xmax": 4, "ymax": 5},
}
_PROLOG = re.compile(
    r"\ufeff?(?:<\?xml[ \t\r\n]+version[ \t\r\n]*=[ \t\r\n]*([\"'])1\.0\1"
    r"(?:[ \t\r\n]+encoding[ \t\r\n]*=[ \t\r\n]*([\"'])(?i:utf-?8)\2)?"
    r"(?:[ \t\r\n]+standalone[ \t\r\n]*=[ \t\r\n]*([\"'])(?:yes|no)\3)?[ \t\r\n]*\?>)?"
)
_TAG = re.compile(
    r"(/?)([A-Za-z_][\w.-]*)"
    r"((?:[ \t\r\n]+[A-Za-z_][\w.-]*[ \t\r\n]*=[ \t\r\n]*(?:\"[^\"<>&]*\"|'[^'<>&]*'))*)[ \t\r\n]*(/?)>",
    re.ASCII,
)
# Text between tags: no markup, no entity, no character XML 1.0 forbids; a field's text
# also no carriage return, which ElementTree would turn into a line feed.
_TEXT = r"[^<&\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]*+"
_FIELD = r"([^<&\x00-\x08\x0b\x0c\r\x0e-\x1f\ufffe\uffff]*+)"
_SPACE = r"[ \t\r\n]*+"
_MAX_PLANS = 256
_PLANS_PER_SHAPE = 8


class Fields(NamedTuple):
    """None where the element is missing, "" where it is present but empty (as ``findtext``)."""

    root: str
    filename: str | None
    width: str | None
    height: str | None
    objects: list[tuple[str | None, ...]]  # name, difficult, xmin, ymin, xmax, ymax


class _Plan(NamedTuple):
    """One skeleton: its pattern's matcher, which capture holds each field, and the fields it lacks.

    ``fixed`` maps a field's position to None (missing) or "" (a self-closing element);
    ``groups`` then names the whole match as a placeholder for it.
    """

    root: str
    fullmatch: Callable[[str], re.Match[str] | None]
    groups: tuple[int, ...]
    fixed: dict[int, str | None]
    objects: tuple[slice, ...]


class FieldReader:
    """Reads the annotations of one dataset, remembering the plans it learned."""

    def __init__(self) -> None:
        self._plans: dict[int, list[_Plan]] = {}
        self._learned = 0

    def read(self, data: bytes) -> Fields | str:
        """The fields, or ElementTree's parse error as a string."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return _tree_fields(data)
        shape = text.count("<")
        if "]]>" not in text:
            for plan in self._plans.get(shape, ()):
                fields = _apply(plan, text)
                if fields is not None:
                    return fields
        fields = _tree_fields(data)
        if isinstance(fields, Fields) and self._learned < _MAX_PLANS and "]]>" not in text:
            plan = _plan(text)
            known = self._plans.setdefault(shape, [])
            if plan is not None and len(known) < _PLANS_PER_SHAPE and _apply(plan, text) == fields:
                known.append(plan)
                self._learned += 1
        return fields


def _plan(text: str) -> _Plan | None:
    """Where ElementTree's ``findtext`` would find each field in files shaped like this one.

    The prolog (byte-order mark, XML declaration) is kept literally, so files that repeat
    it match; one that declares an encoding other than UTF-8 gets no plan.
    """
    prolog = _PROLOG.match(text)
    if prolog is None:
        return None
    chunks = text[prolog.end() :].split("<")
    pieces = [re.escape(prolog.group()), _SPACE]
    header: list[int | str | None] = [None, None, None]  # filename, width, height: capture number
    objects: list[list[int | str | None]] = []
    stack: list[str] = []
    root = None
    captures = 0
    for index in range(1, len(chunks)):
        match = _TAG.match(chunks[index])
        if match is None or "xmlns" in match.group(3):
            return None
        closing, tag, attributes, self_closing = match.groups()
        last = index == len(chunks) - 1
        text_pattern = _SPACE if last else _TEXT
        if closing:
            if attributes or self_closing or not stack or stack.pop() != tag or (not stack and not last):
                return None
        else:
            if root is None:
                root = tag
            elif not stack:
                return None
            if len(stack) == 1 and tag == "object":
                objects.append([None] * 6)
            positions = _FIELDS_OF.get((len(stack) + 1, tuple(stack[1:])), {})
            if tag in positions:
                target = header if len(stack) == 1 or stack[1] == "size" else objects[-1]
                if target[positions[tag]] is None and self_closing:
                    target[positions[tag]] = ""
                elif target[positions[tag]] is None:
                    captures += 1
                    target[positions[tag]] = captures
                    text_pattern = _FIELD
            if not self_closing:
                stack.append(tag)
        pieces.append(re.escape("<" + match.group()) + text_pattern)
    if stack or root is None:
        return None
    slots = [*header, *(slot for slots in objects for slot in slots)]
    return _Plan(
        root,
        re.compile("".join(pieces)).fullmatch,
        tuple(slot if isinstance(slot, int) else 0 for slot in slots),
        {position: slot for position, slot in enumerate(slots) if not isinstance(slot, int)},
        tuple(slice(start, start + 6) for start in range(3, len(slots), 6)),
    )


def _apply(plan: _Plan, text: str) -> Fields | None:
    match = plan.fullmatch(text)
    if match is None:
        return None
    values = match.group(*plan.groups)
    if plan.fixed:
        patched = list(values)
        for position, value in plan.fixed.items():
            patched[position] = value
        values = tuple(patched)
    return Fields(plan.root, values[0], values[1], values[2], list(map(values.__getitem__, plan.objects)))


def _tree_fields(data: bytes) -> Fields | str:
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return "document type declarations and entities are not allowed in annotations"
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        return str(error)
    except (ValueError, LookupError, RecursionError) as error:
        return f"cannot parse ({error})"
    objects = [
        (
            obj.findtext("name"),
            obj.findtext("difficult"),
            *(obj.findtext(f"bndbox/{key}") for key in _COORDINATES),
        )
        for obj in root.findall("object")
    ]
    return Fields(
        root.tag,
        root.findtext("filename"),
        root.findtext("size/width"),
        root.findtext("size/height"),
        objects,
    )
