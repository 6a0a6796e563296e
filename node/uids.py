"""DICOM UID validation: the only way a string from the wire becomes part of a file path."""

from __future__ import annotations

import re
from typing import Final

from node.exceptions import InvalidInstanceError

#: PS3.5 9.1: components of digits separated by dots, at most 64 characters.
UID_PATTERN: Final = re.compile(r"[0-9]+(\.[0-9]+)*")  # whole string: fullmatch (a "$" lets "\n" end it)
MAX_UID_LENGTH: Final = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid UID (PS3.5 9.1)."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(UID_PATTERN.fullmatch(value))


def validated_uid(value: object, attribute: str, where: str = "dataset") -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidInstanceError` naming it.

    Parameters
    ----------
    value:
        The raw element value (trailing NUL/space padding from the wire is stripped).
    attribute:
        Keyword of the element, for the message (e.g. ``SOPInstanceUID``).
    where:
        What the value came from, for the message.
    """
    text = str(value).rstrip("\x00 ") if value is not None else ""
    if not is_valid_uid(text):
        raise InvalidInstanceError(f"{where}: {attribute} {shown_uid(text)} is not a valid DICOM UID")
    return text


#: Characters an invalid UID may be shown with in a message: they cannot spell a name or an ID with
#: letters (some RIS put the accession number in StudyInstanceUID).
_SHOWABLE: Final = frozenset("0123456789.\\ ")


def shown_uid(text: str) -> str:
    """An invalid UID as a message may show it: quoted (cut to 80 characters) when it holds digits, dots,
    spaces and backslashes only, else its length and why it is not shown."""
    if set(text) <= _SHOWABLE:
        return repr(text if len(text) <= 80 else text[:77] + "...")
    return f"of {len(text)} characters (not shown: it holds characters other than digits and dots)"
