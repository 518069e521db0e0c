"""The few values a VOC annotation carries, read exactly as ElementTree would, but fast.

Converting tens of thousands of annotations is dominated by XML parsing, and files of
one dataset almost always share their *skeleton*: the same declaration and tags in the
same order, only the text between them differs and the number of objects. :class:`FieldReader`
parses the first file of each skeleton with ElementTree, learns which text holds each
field, and compiles the skeleton into three regular expressions: the *frame* before the
first object, one per shape of ``<object>`` element, and the frame after the last one
(declaration and tags literally, a capture for each field's text). A later file is read by
matching the first frame, then object after object, then the closing frame: one pass,
linear in the number of objects, and the same plan serves a file with one object and one
with 8,000. The plan is checked to reproduce ElementTree's answer on the file it came from.

That is exact, not a heuristic. A matching file has byte-for-byte the learned markup (its
objects one after another, each shaped like one the plan knows), text between the tags that
holds no ``<``, no ``&`` (so no entity, comment, CDATA or processing instruction) and no
character XML forbids, field texts without a carriage return (which ElementTree would
normalise), and nothing but white space around the root; text cannot change the structure
of such a document, so ElementTree would read the same tree. Everything else, malformed
files included, goes through ElementTree, whose message is reported.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from itertools import accumulate
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
_FIELD_TEXT = r"[^<&\x00-\x08\x0b\x0c\r\x0e-\x1f\ufffe\uffff]*+"
_FIELD = f"({_FIELD_TEXT})"
_SPACE = r"[ \t\r\n]*+"
_MAX_PLANS = 32
_PLANS_TRIED = 4


class Fields(NamedTuple):
    """None where the element is missing, "" where it is present but empty (as ``findtext``)."""

    root: str
    filename: str | None
    width: str | None
    height: str | None
    objects: list[tuple[str | None, ...]]  # name, difficult, xmin, ymin, xmax, ymax


class _Objects(NamedTuple):
    """One shape of ``<object>``: its matcher, the capture of each of its 6 fields, fields it lacks."""

    match: Callable[[str, int], re.Match[str] | None]
    groups: tuple[int, ...]
    fixed: dict[int, str | None]
    in_order: bool  # the captures are exactly the 6 fields in order: ``groups()`` is the answer
    findall: Callable[[str], list[tuple[str, ...]]]
    uncaptured: str  # the pattern without its captures, to check a run of such objects in one match


class _Plan(NamedTuple):
    """One skeleton: the frames around the objects, the object shapes, where the header fields are.

    ``frame`` gives, for filename, width and height, ``("head" | "tail", capture)`` or the
    value of a field the skeleton lacks (None) or holds empty (a self-closing element, "").
    """

    root: str
    head: Callable[[str], re.Match[str] | None]
    tail: Callable[[str, int], re.Match[str] | None]
    objects: tuple[_Objects, ...]
    frame: tuple[tuple[str, int] | str | None, ...]
    whole: Callable[[str], re.Match[str] | None] | None
    """For the usual plan with one object shape: head, the run of objects and tail in one match."""
    whole_run: int  # the group of ``whole`` holding the run of objects (0: the plan has no object)
    whole_frame: tuple[int | str | None, ...]


class FieldReader:
    """Reads the annotations of one dataset, remembering the plans it learned (most recent first)."""

    def __init__(self) -> None:
        self._plans: list[_Plan] = []
        self._learned = 0

    def read(self, data: bytes) -> Fields | str:
        """The fields, or ElementTree's parse error as a string."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return _tree_fields(data)
        plain = "]]>" not in text
        if plain:
            for index, plan in enumerate(self._plans[:_PLANS_TRIED]):
                fields = _apply(plan, text)
                if fields is not None:
                    if index:
                        self._plans.insert(0, self._plans.pop(index))
                    return fields
        fields = _tree_fields(data)
        if isinstance(fields, Fields) and plain and self._learned < _MAX_PLANS:
            plan = _plan(text)
            if plan is not None and _apply(plan, text) == fields:
                self._plans.insert(0, plan)
                self._learned += 1
        return fields


def _plan(text: str) -> _Plan | None:
    """Where ElementTree's ``findtext`` would find each field in files shaped like this one.

    The prolog (byte-order mark, XML declaration) is kept literally, so files that repeat
    it match; one that declares an encoding other than UTF-8 gets no plan, and so does one
    whose top-level objects are not one run (another element between two of them). An
    object shaped like one already learned is skipped with one match, so learning from a
    file with 8,000 objects costs about what reading it does.
    """
    prolog = _PROLOG.match(text)
    if prolog is None:
        return None
    chunks = text[prolog.end() :].split("<")
    # offsets[i - 1]: where the "<" that opens chunk i is
    offsets = list(
        accumulate((len(chunk) + 1 for chunk in chunks[1:-1]), initial=prolog.end() + len(chunks[0]))
    )
    pieces = [re.escape(prolog.group()), _SPACE]
    owners: list[int | None] = [None, None]  # per piece: the field whose text it captures
    frame: list[str | int | None] = [None, None, None]  # filename, width, height: a piece index or fixed
    shapes: dict[str, _Objects] = {}
    current: list[str | int | None] | None = None  # the fields of the object being learned
    head_end = object_start = None  # the first object's piece (what comes before is the head); this one's
    run_over = False  # a top-level element other than an object came after the objects
    stack: list[str] = []
    root = None
    index = 1
    while index < len(chunks):
        match = _TAG.match(chunks[index])
        if match is None or "xmlns" in match.group(3):
            return None
        closing, tag, attributes, self_closing = match.groups()
        last = index == len(chunks) - 1
        text_pattern = _SPACE if last else _TEXT
        owner = None
        if closing:
            if attributes or self_closing or not stack or stack.pop() != tag or (not stack and not last):
                return None
        else:
            if root is None:
                root = tag
            elif not stack:
                return None
            if len(stack) == 1 and tag == "object":
                if run_over:
                    return None
                if head_end is None:
                    head_end = len(pieces)
                skipped = _known_object(shapes, text, offsets[index - 1])
                if skipped:
                    index += skipped
                    continue
                current, object_start = [None] * 6, len(pieces)
            elif len(stack) == 1 and head_end is not None:
                run_over = True
            positions = _FIELDS_OF.get((len(stack) + 1, tuple(stack[1:])), {})
            if tag in positions:
                target = frame if current is None else current
                position = positions[tag]
                if target[position] is None and self_closing:
                    target[position] = ""
                elif target[position] is None:
                    target[position] = len(pieces)
                    owner = position
                    text_pattern = _FIELD
            if not self_closing:
                stack.append(tag)
        pieces.append(re.escape("<" + match.group()) + text_pattern)
        owners.append(owner)
        if current is not None and len(stack) == 1:  # the top-level object just closed: learn its shape
            pattern, groups = _compiled(pieces, owners, object_start, len(pieces))
            captures = tuple(groups[slot] if isinstance(slot, int) else 0 for slot in current)
            fixed = {position: slot for position, slot in enumerate(current) if not isinstance(slot, int)}
            in_order = not fixed and captures == (1, 2, 3, 4, 5, 6) and pattern.groups == 6
            if pattern.pattern not in shapes:
                uncaptured = pattern.pattern.replace(_FIELD, _FIELD_TEXT)
                shapes[pattern.pattern] = _Objects(
                    pattern.match, captures, fixed, in_order, pattern.findall, uncaptured
                )
            del pieces[object_start:], owners[object_start:]
            current = None
        index += 1
    if stack or root is None:
        return None
    split = head_end if head_end is not None else len(pieces)
    head, head_groups = _compiled(pieces, owners, 0, split)
    tail, tail_groups = _compiled(pieces, owners, split, len(pieces))
    slots: list[tuple[str, int] | str | None] = []
    for value in frame:
        if isinstance(value, int):
            slots.append(("head", head_groups[value]) if value < split else ("tail", tail_groups[value]))
        else:
            slots.append(value)
    whole, whole_run, whole_frame = None, 0, ()
    if len(shapes) <= 1 and all(shape.in_order for shape in shapes.values()):
        run = "".join(f"((?:{shape.uncaptured})*+)" for shape in shapes.values())
        whole = re.compile(head.pattern + run + tail.pattern).fullmatch
        whole_run = head.groups + 1 if shapes else 0
        offset = head.groups + (1 if shapes else 0)
        whole_frame = tuple(
            (slot[1] if slot[0] == "head" else offset + slot[1]) if isinstance(slot, tuple) else slot
            for slot in slots
        )
    return _Plan(
        root, head.match, tail.fullmatch, tuple(shapes.values()), tuple(slots), whole, whole_run, whole_frame
    )


def _known_object(shapes: dict[str, _Objects], text: str, position: int) -> int:
    """How many tags the object at ``position`` has if it is shaped like a learned one, else 0."""
    for shape in shapes.values():
        found = shape.match(text, position)
        if found is not None:
            return found.group().count("<")
    return 0


def _compiled(
    pieces: list[str], owners: list[int | None], start: int, end: int
) -> tuple[re.Pattern[str], dict[int, int]]:
    """The pattern of ``pieces[start:end]`` and, for each piece holding a capture, its group number."""
    groups: dict[int, int] = {}
    for index in range(start, end):
        if owners[index] is not None:
            groups[index] = len(groups) + 1
    return re.compile("".join(pieces[start:end])), groups


def _apply(plan: _Plan, text: str) -> Fields | None:
    if plan.whole is not None:
        whole = plan.whole(text)
        if whole is None:
            return None
        objects = plan.objects[0].findall(whole.group(plan.whole_run)) if plan.whole_run else []
        frame = [whole.group(slot) if isinstance(slot, int) else slot for slot in plan.whole_frame]
        return Fields(plan.root, frame[0], frame[1], frame[2], objects)
    head = plan.head(text)
    if head is None:
        return None
    position = head.end()
    objects: list[tuple[str | None, ...]] = []
    shapes = plan.objects
    while True:
        for shape in shapes:
            found = shape.match(text, position)
            if found is not None:
                break
        else:
            break
        if shape.in_order:
            objects.append(found.groups())
        else:
            values = list(found.group(*shape.groups))
            for slot, value in shape.fixed.items():
                values[slot] = value
            objects.append(tuple(values))
        position = found.end()
    tail = plan.tail(text, position)
    if tail is None:
        return None
    frame = [
        (head if slot[0] == "head" else tail).group(slot[1]) if isinstance(slot, tuple) else slot
        for slot in plan.frame
    ]
    return Fields(plan.root, frame[0], frame[1], frame[2], objects)


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
