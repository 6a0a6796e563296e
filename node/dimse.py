"""Named DIMSE status codes and association-rejection reasons used by the node (PS3.7 Annex C, PS3.8 9.3.4).

Every status the SCP returns comes from here, so that a reader never meets a bare hex code.
"""

from __future__ import annotations

from typing import Final

#: PS3.7 C.1.1: the operation completed.
SUCCESS: Final = 0x0000
#: PS3.4 B.2.3: Refused, out of resources (the spool or the database could not take the instance).
OUT_OF_RESOURCES: Final = 0xA700
#: PS3.4 B.2.3: Error, data set does not match SOP Class.
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
#: PS3.4 B.2.3: Error, cannot understand (the data set could not be decoded or lacks required UIDs).
CANNOT_UNDERSTAND: Final = 0xC000
#: PS3.7 C.5.14: Failure, processing failure (an unexpected error in a handler).
PROCESSING_FAILURE: Final = 0x0110
#: PS3.4 B.2.3: Warning, coercion of data elements (the object was stored).
WARNING_COERCION: Final = 0xB000
#: PS3.4 B.2.3: Warning, elements discarded (the object was stored).
WARNING_ELEMENTS_DISCARDED: Final = 0xB006
#: PS3.4 B.2.3: Warning, data set does not match SOP Class (the object was stored).
WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xB007

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result, source, reason/diagnostic.
REJECTED_PERMANENT: Final = 0x01
REJECTED_TRANSIENT: Final = 0x02
SOURCE_SERVICE_USER: Final = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION: Final = 0x03
DIAG_NO_REASON: Final = 0x01
DIAG_TEMPORARY_CONGESTION: Final = 0x01
#: Diagnostics of the service user: the calling AE title, the called AE title not recognized.
DIAG_CALLING_AE_NOT_RECOGNIZED: Final = 0x03
DIAG_CALLED_AE_NOT_RECOGNIZED: Final = 0x07

NAMES: Final[dict[int, str]] = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Data set does not match SOP Class",
    CANNOT_UNDERSTAND: "Cannot understand",
    PROCESSING_FAILURE: "Processing failure",
    WARNING_COERCION: "Warning: coercion of data elements",
    WARNING_ELEMENTS_DISCARDED: "Warning: elements discarded",
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS: "Warning: data set does not match SOP Class",
}


def describe(status: int) -> str:
    """``0xA700 (Out of resources)`` for a status code, for log lines and error messages."""
    return f"0x{status:04X} ({NAMES.get(status, 'unknown status')})"


def refused_for_good(status: int | None) -> bool:
    """Whether a C-STORE failure status refuses the object itself, so that sending it again cannot
    help (PS3.4 B.2.3, PS3.7 C.5): SOP class not supported (0x0122), not authorized (0x0124), data
    set does not match SOP class (0xA9xx), cannot understand (0xCxxx). Out of resources (0xA7xx)
    and the rest may pass on a later try."""
    if status is None:
        return False
    return status in (0x0122, 0x0124) or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def stored(status: int | None) -> bool:
    """Whether a C-STORE response says the object was stored: Success, or a Warning status (PS3.7
    C.1.3: the operation completed with a warning; PS3.4 B.2.3 0xB000, 0xB006, 0xB007)."""
    if status is None:
        return False
    return status == SUCCESS or 0xB000 <= status <= 0xBFFF or status in (0x0001, 0x0107, 0x0116)


def ae_title_problem(value: str) -> str | None:
    """What makes ``value`` no valid AE title (PS3.5 6.2, VR AE), or None when it is one.

    An AE title is 1-16 characters of the default character repertoire (ASCII) without backslash
    or control characters, and not only spaces (leading and trailing spaces are not significant).
    """
    printable = all(" " <= c <= "~" and c != "\\" for c in value)
    if value.strip() and len(value) <= 16 and printable:
        return None
    return "must be 1-16 ASCII characters, not all spaces, no backslash or control character"
