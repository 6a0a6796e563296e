"""No attribute value of a DICOM object reaches the node's log through pydicom, highdicom or pynetdicom.

The node's own log lines name UIDs, counts and attribute keywords only. The libraries are not so
careful: highdicom warns ``The string "DOE" is unlikely to represent the intended person name``,
pydicom (reading and writing in its default WARN validation mode) ``Invalid value for VR DA:
'19700101x'``, and pynetdicom dumps whole data sets element by element (``(0010,0010) PN [DOE^JOHN]
# 1 PatientName``) when it logs identifiers or debugs. :class:`LibraryValueFilter` rewrites every
record of those libraries, and every Python warning (``logging.captureWarnings`` turns warnings
into records of the logger ``py.warnings``), before a handler writes it:

- a data set element line keeps its tag, VR and keyword (when printed after '#'), nothing else;
- anything in single or double quotes, in square brackets, or after ``=`` becomes ``<scrubbed>``,
  except a quoted DICOM keyword (highdicom's ``copied attribute "PatientName"`` names no value); a
  quoted value runs to the last same quote on its line, and over the following lines when its quote
  does not close on its own (a value may hold quotes and line breaks), so a keyword stays only when
  no same quote follows it on its line (a value may begin with a keyword and a quote);
- a warning keeps its category and scrubbed message, without the file, line and source line;
- a traceback attached to such a record is scrubbed the same way.

:func:`install` puts the filter on the handlers of the root logger (and on ``logging.lastResort``)
and routes warnings into logging; ``segnode serve`` and ``segnode demo`` call it once, after the
CLI configured logging.
"""

from __future__ import annotations

import logging
import re

from pydicom.datadict import tag_for_keyword

#: Loggers whose records are rewritten (and their children).
LIBRARY_LOGGERS = ("pydicom", "highdicom", "pynetdicom", "py.warnings")
SCRUBBED = "<scrubbed>"

_TAG_LINE = re.compile(r"^(?P<indent>\s*)(?P<tag>\(\s*[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\s*\))(?P<rest>.*)$")
_VR = re.compile(r"[A-Z]{2}")
_QUOTE = re.compile(r"['\"]")
_BRACKETED = re.compile(r"\[[^\]\n]*\]?")
_ASSIGNED = re.compile(r"=\s*[^\s,;)]+")
_KEYWORD = re.compile(r"[A-Z][A-Za-z0-9]+")
_WARNING = re.compile(r"^.*?:\d+: (?P<category>\w+): (?P<message>.*)$", re.DOTALL)


def scrub_text(text: str) -> str:
    """``text`` with every value a library might have printed replaced by ``<scrubbed>``."""
    text = "\n".join(_scrub_tag_line(line) for line in text.split("\n"))
    lines = _scrub_quoted(text).split("\n")
    return "\n".join(_ASSIGNED.sub(f"={SCRUBBED}", _BRACKETED.sub(f"[{SCRUBBED}]", line)) for line in lines)


def _scrub_tag_line(line: str) -> str:
    match = _TAG_LINE.match(line)
    if not match:
        return line
    rest = match["rest"]
    words = rest.split()
    vr = f" {words[0]}" if words and _VR.fullmatch(words[0]) else ""
    tail = f" # {rest.rsplit('#', 1)[1].strip()}" if "#" in rest else ""
    return f"{match['indent']}{match['tag']}{vr} {SCRUBBED}{tail}"


def _scrub_quoted(text: str) -> str:
    """Every quoted value in ``text`` scrubbed; a quoted DICOM keyword kept.

    A value may hold either quote character (pydicom's ``'19\\'X"01'``, highdicom's ``"O"X"``), so it
    runs from its opening quote to the last same quote on its line; a value whose quote does not
    close on its line goes on over the following lines, to the last same quote of the text, or to its
    end. A keyword is kept only when it is all that runs so: a keyword followed by the same quote
    later on its line may be the start of a value, and goes with it.
    """
    parts: list[str] = []
    pos = 0
    while (match := _QUOTE.search(text, pos)) is not None:
        quote, start = match.group(), match.start()
        parts.append(text[pos:start])
        line_end = text.find("\n", start)
        end = text.rfind(quote, start + 1, len(text) if line_end < 0 else line_end)
        # A keyword stays only as the whole of what its quotes hold: a value may begin with a keyword
        # and a quote (highdicom's ``The string "PatientName" x "Y"``), so the same quote further on
        # the line makes it a value.
        inner = text[start + 1 : end] if end >= 0 else ""
        if _KEYWORD.fullmatch(inner) and tag_for_keyword(inner) is not None:
            parts.append(text[start : end + 1])
            pos = end + 1
            continue
        if end < 0:
            end = text.rfind(quote, start + 1)
        parts.append(f"'{SCRUBBED}'")
        pos = len(text) if end < 0 else end + 1
    parts.append(text[pos:])
    return "".join(parts)


def _warning_text(text: str) -> str:
    match = _WARNING.match(text.rstrip("\n"))
    if not match:
        return text
    lines = match["message"].split("\n")
    if len(lines) > 1 and lines[-1].startswith("  "):  # warnings.formatwarning's source line
        lines = lines[:-1]
    return f"{match['category']}: " + "\n".join(lines).strip()


class LibraryValueFilter(logging.Filter):
    """Rewrites records of :data:`LIBRARY_LOGGERS` so that they carry no attribute values."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub ``record`` in place when it comes from a library; always keep it."""
        if not record.name.startswith(LIBRARY_LOGGERS) or getattr(record, "segnode_scrubbed", False):
            return True
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: keep nothing of it
            text = str(record.msg)
        if record.name == "py.warnings":
            text = _warning_text(text)
        record.msg, record.args = scrub_text(text), None
        if record.exc_info:
            record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info)
        record.segnode_scrubbed = True
        return True


_FILTER = LibraryValueFilter()


def install(logger: logging.Logger | None = None) -> LibraryValueFilter:
    """Route Python warnings into logging and put the filter on ``logger``'s handlers.

    Parameters
    ----------
    logger:
        The logger whose handlers write the node's log; the root logger by default. The filter
        also goes on ``logging.lastResort``, which writes when no handler is configured.
        Idempotent; handlers added afterwards need :func:`install` again.

    Returns
    -------
    LibraryValueFilter
        The one filter instance.
    """
    logging.captureWarnings(True)
    handlers = list((logger or logging.getLogger()).handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    return _FILTER
