"""Patient and study attributes of the source images, made fit for the SEG and SR that copy them.

highdicom copies the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3) from the first source image into the
SEG, and the SR copies them from the SEG. Real studies carry values outside the standard, and
highdicom 0.28.2 refuses some of them, which used to fail the job:

- ``ValueError`` for a PatientSex outside M/F/O (``'0000' is not a valid PatientSexValues``);
- ``ValueError`` for a PatientBirthDate, StudyDate or StudyTime that is no date or time ('2023',
  '00000000', '99');
- ``AttributeError`` for an absent PatientName, PatientID, PatientBirthDate, PatientSex,
  AccessionNumber, StudyID, StudyDate or StudyTime (read as attributes of the source);
- a ``UserWarning`` that prints the name for a PatientName without a '^';
- and it copies over-long SH/LO values, bad AS/DS values etc. unchanged, so that the SEG fails a
  strict reader.

:func:`clean_sources` returns copies of the source datasets in which every attribute of those
modules is valid for its VR (PS3.5 6.2, Table 6.2-1), by the rules below; the source datasets and
the files on disk are not modified. Each change is logged once per object built, naming the
attribute keyword and the rule, never the value.

Rules
-----
============================  ==========================================  ============================
attribute                     valid (PS3.3 module, PS3.5 VR)              what we do otherwise
============================  ==========================================  ============================
PatientName (PN, Type 2)      PN: at most 3 component groups ('='),       control characters removed;
                              each at most 64 characters and 5            a group over 64 characters
                              components ('^'); highdicom also wants a    loses the excess from its
                              '^' in the value                            longest component; a name
                                                                          with no '^' gets a trailing
                                                                          '^' (the same name by PS3.5
                                                                          6.2.1.1: trailing empty
                                                                          components may be omitted)
PatientID (LO, Type 2)        LO: at most 64 characters, no '\\', no       surrounding spaces stripped
AccessionNumber (SH, Type 2)  control characters; SH the same with 16     (not significant in SH/LO);
StudyID (SH, Type 2)                                                      still invalid: written empty,
                                                                          never cut: a cut identifier
                                                                          can name another patient or
                                                                          order. Absent: written empty
PatientSex (CS, Type 2)       enumerated M, F, O (C.7.1.1) or empty       'MALE'/'FEMALE' in any case
                                                                          and m/f/o -> M/F/O; anything
                                                                          else ('0000', 'U') empty:
                                                                          unknown, not "other", which
                                                                          would state something the
                                                                          source did not
PatientBirthDate (DA, Type 2) DA: YYYYMMDD, a real calendar date          empty (never guessed: '2023'
StudyDate (DA, Type 2)                                                    is not 20230101)
StudyTime (TM, Type 2)        TM: HH[MM[SS[.F{1,6}]]], in range           empty
ReferringPhysicianName        PN as PatientName                           as PatientName, but no '^'
(PN, Type 2)                                                              added (highdicom does not
                                                                          check it); absent: empty
other Type 2 / 2C attributes  their VR                                    as below; when nothing
of these modules                                                          valid remains: empty
other text (SH, LO, ST, LT,   their VR's length and repertoire            stripped; cut to the VR's
UC, UT, PN)                                                               maximum length; identifiers
                                                                          (IDs, numbers) omitted, not
                                                                          cut
other coded or formatted      their VR (CS, AS, DA, TM, DT, DS, IS, UI)   omitted (Type 3)
values
sequences (SQ)                every element inside valid for its VR;      omitted (Type 3)
                              Type 3: at least one item
several values in a           one value (a backslash read as a            joined with spaces, then the
single-valued attribute       separator: PatientID '12\\34')               rules above
binary values (US, FD ...)    always valid                                copied
============================  ==========================================  ============================

StudyInstanceUID is copied as it is: the SEG must stay in the source's study.

The same rules hold for the General Equipment attributes highdicom 0.28.2 reads from the first source
for the outputs' acquisition-equipment item (Contributing Equipment Sequence, PS3.3 C.12.1:
:data:`EQUIPMENT_ATTRIBUTES`): there one value over its VR's length (a 20-character StationName, SH
16) or a DT that is no date and time (AcquisitionDateTime '20231301999999') made highdicom drop the
whole item without a word, and the SEG and SR no longer named the scanner. Text is cut (the
DeviceSerialNumber, an identifier, omitted), a bad AcquisitionDateTime omitted; the item is kept.

SpecificCharacterSet (PS3.3 C.12.1.1.2) says how the copied text is written. highdicom refuses the
standard's own ``\\ISO 2022 IR 87`` (an empty first value, which means ISO 2022 IR 6) and a single
value with code extensions (``ISO 2022 IR 100``), which used to fail the job. The outputs name the
source's character set in its standard form: an empty first value becomes ISO 2022 IR 6; a single
``ISO 2022 IR n`` becomes ``ISO_IR n`` for a single-byte set, ``ISO 2022 IR 6\\ISO 2022 IR n`` for a
multi-byte one, and is dropped for ``ISO 2022 IR 6`` (the default repertoire). Where that is still
not a set highdicom writes, or a copied value (or other text the object carries: the SR's series
descriptions, the card's labels) has a character the set cannot encode, the outputs are written in
UTF-8 (``ISO_IR 192``). The default repertoire (no SpecificCharacterSet) is ASCII: a Latin-1 name in
a source without the attribute also makes the outputs UTF-8. Text is always decoded with the
source's own set first.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from highdicom.enum import SpecificCharacterSetValues
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DT, MAX_VALUE_LEN, validate_value

logger = logging.getLogger(__name__)

#: Root-level attributes of the modules highdicom copies from the source (PS3.3 C.7.1.1 Patient,
#: C.7.1.3 Clinical Trial Subject, C.7.2.1 General Study, C.7.2.2 Patient Study, C.7.2.3 Clinical
#: Trial Study), as highdicom 0.28.2's module tables list them.
_COPIED = """
    ReferencedPatientSequence PatientName PatientID IssuerOfPatientID TypeOfPatientID
    IssuerOfPatientIDQualifiersSequence SourcePatientGroupIdentificationSequence
    GroupOfPatientsIdentificationSequence PatientBirthDate PatientBirthTime
    PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar
    PatientAlternativeCalendar PatientSex QualityControlSubject StrainDescription StrainNomenclature
    StrainStockSequence StrainAdditionalInformation StrainCodeSequence GeneticModificationsSequence
    OtherPatientNames OtherPatientIDsSequence ReferencedPatientPhotoSequence EthnicGroupCodeSequence
    PatientSpeciesDescription PatientSpeciesCodeSequence PatientBreedDescription
    PatientBreedCodeSequence BreedRegistrationSequence ResponsiblePerson ResponsiblePersonRole
    ResponsibleOrganization PatientComments PatientIdentityRemoved DeidentificationMethod
    DeidentificationMethodCodeSequence
    ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName
    IssuerOfClinicalTrialProtocolID OtherClinicalTrialProtocolIDsSequence ClinicalTrialSiteID
    ClinicalTrialSiteName IssuerOfClinicalTrialSiteID ClinicalTrialSubjectID
    IssuerOfClinicalTrialSubjectID ClinicalTrialSubjectReadingID IssuerOfClinicalTrialSubjectReadingID
    ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
    StudyDate StudyTime AccessionNumber IssuerOfAccessionNumberSequence ReferringPhysicianName
    ReferringPhysicianIdentificationSequence ConsultingPhysicianName
    ConsultingPhysicianIdentificationSequence StudyDescription ProcedureCodeSequence PhysiciansOfRecord
    PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
    PhysiciansReadingStudyIdentificationSequence ReferencedStudySequence StudyInstanceUID StudyID
    RequestingService RequestingServiceCodeSequence ReasonForPerformedProcedureCodeSequence
    AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize
    PatientSizeCodeSequence PatientBodyMassIndex MeasuredAPDimension MeasuredLateralDimension
    PatientWeight MedicalAlerts Allergies Occupation SmokingStatus AdditionalPatientHistory
    PregnancyStatus LastMenstrualDate PatientSexNeutered ReasonForVisit ReasonForVisitCodeSequence
    AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID ServiceEpisodeDescription
    IssuerOfServiceEpisodeIDSequence PatientState
    ClinicalTrialTimePointID ClinicalTrialTimePointDescription LongitudinalTemporalOffsetFromEvent
    LongitudinalTemporalEventType ClinicalTrialTimePointTypeCodeSequence
    IssuerOfClinicalTrialTimePointID ConsentForClinicalTrialUseSequence
"""
COPIED_ATTRIBUTES: tuple[str, ...] = tuple(_COPIED.split())

#: Root-level attributes highdicom 0.28.2 reads from the first source for the outputs' acquisition-
#: equipment item (``ContributingEquipment.for_image_acquisition``; one invalid value and the item is
#: dropped): the General Equipment module's (PS3.3 C.7.5.1) and AcquisitionDateTime.
EQUIPMENT_ATTRIBUTES: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
)

#: Type 2 attributes highdicom reads from the source (an absent one is an AttributeError there).
REQUIRED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: Other Type 2 and 2C attributes of the copied modules: emptied, not omitted, when invalid.
OTHER_TYPE2 = (
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientSexNeutered",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialTimePointID",
)
#: Identifiers: a value cut to length could identify another patient, order or study; never cut.
IDENTIFIERS = frozenset(
    {
        "PatientID",
        "AccessionNumber",
        "StudyID",
        "IssuerOfPatientID",
        "AdmissionID",
        "ServiceEpisodeID",
        "ClinicalTrialProtocolID",
        "ClinicalTrialSiteID",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSubjectReadingID",
        "ClinicalTrialTimePointID",
        "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
        "DeviceSerialNumber",
    }
)
_TYPE2 = frozenset(REQUIRED_TYPE2 + OTHER_TYPE2)
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})
_FORMATTED_VRS = frozenset({"CS", "AS", "DA", "TM", "DT", "DS", "IS", "UI", "AE", "UR"})
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F"}
#: Characters no text VR allows: controls other than TAB, LF, FF, CR, ESC (PS3.5 6.1.2, 6.2).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?")
_OMIT = object()
#: What the outputs are written in when the source's character set cannot be (PS3.3 C.12.1.1.2).
UTF8 = "ISO_IR 192"
_CHARSETS = frozenset(v.value for v in SpecificCharacterSetValues)
_CODE_EXTENSIONS = frozenset(v for v in _CHARSETS if v.startswith("ISO 2022 IR "))
_MULTI_BYTE = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})


@dataclass(frozen=True)
class Correction:
    """One change made to an attribute: its keyword and the rule applied (no value)."""

    keyword: str
    rule: str


def clean_sources(
    sources: Sequence[Dataset], *, what: str = "output", extra_texts: Sequence[str] = ()
) -> list[Dataset]:
    """Copies of ``sources`` whose patient and study attributes are valid, by the module's rules.

    Parameters
    ----------
    sources:
        The source images (or the SEG an SR copies from). Not modified.
    what:
        Name of the object being built, for the log lines (``SEG``, ``SR``).
    extra_texts:
        Text the object carries besides the copied attributes (an SR's parameters naming the series
        used, a card's segment labels): the character set chosen must encode it too.

    Returns
    -------
    list[Dataset]
        One shallow copy per source, with the same corrected patient and study attributes; pixel
        data and every other attribute shared with the source.
    """
    if not sources:
        return []
    replacements, corrections = corrected_attributes(sources[0], extra_texts)
    for correction in corrections:
        logger.warning(
            "%s: source attribute %s %s (value not logged)", what, correction.keyword, correction.rule
        )
    return [_with(ds, replacements) for ds in sources]


def corrected_attributes(
    ds: Dataset, extra_texts: Sequence[str] = ()
) -> tuple[dict[str, DataElement | None], list[Correction]]:
    """The replaced elements (None: omit) of ``ds``'s copied and equipment attributes, and what was
    done (``extra_texts``: other text the output carries, see :func:`clean_sources`)."""
    replacements: dict[str, DataElement | None] = {}
    corrections: list[Correction] = []
    for keyword in (*COPIED_ATTRIBUTES, *EQUIPMENT_ATTRIBUTES):
        tag = tag_for_keyword(keyword)
        if tag is None:  # pragma: no cover - every keyword above is in pydicom's dictionary
            continue
        if tag not in ds:
            if keyword in REQUIRED_TYPE2:
                replacements[keyword] = DataElement(tag, dictionary_VR(tag), None)
                corrections.append(Correction(keyword, "absent: written empty (Type 2)"))
            continue
        result = _clean_element(ds, keyword, tag)
        if result is None:
            continue
        value, rule = result
        if value is _OMIT:
            replacements[keyword] = None
        else:
            replacements[keyword] = DataElement(tag, dictionary_VR(tag), value)
        corrections.append(Correction(keyword, rule))
    charset = _character_set(ds, [*_copied_texts(ds, replacements), *(t for t in extra_texts if t)])
    if charset is not None:
        value, rule = charset
        element = None if value is _OMIT else DataElement(0x00080005, "CS", value)
        replacements["SpecificCharacterSet"] = element
        corrections.append(Correction("SpecificCharacterSet", rule))
    return replacements, corrections


def _copied_texts(ds: Dataset, replacements: dict[str, DataElement | None]) -> list[str]:
    """The text of every copied PN and text attribute as the outputs will carry it (root level; the
    equipment attributes' too, which the Contributing Equipment item carries)."""
    texts: list[str] = []
    for keyword in (*COPIED_ATTRIBUTES, *EQUIPMENT_ATTRIBUTES):
        element: DataElement | None
        if keyword in replacements:
            element = replacements[keyword]
        else:
            tag = tag_for_keyword(keyword)
            try:
                element = ds[tag] if tag is not None and tag in ds else None
            except Exception:  # unreadable values were replaced above
                element = None
        if element is None or not (element.VR in _TEXT_VRS or element.VR == "PN"):
            continue
        value = element.value
        texts += [str(v) for v in (value if isinstance(value, MultiValue) else [value]) if v]
    return texts


def _character_set(ds: Dataset, texts: list[str]) -> tuple[Any, str] | None:
    """``(new SpecificCharacterSet or _OMIT, rule)``, or None when the source's is written as it is."""
    raw = ds.get("SpecificCharacterSet")
    if not raw:
        named: list[str] = []
    else:
        named = [str(v).strip() for v in (raw if isinstance(raw, MultiValue) else [raw])]
    standard = _standard_charset(named)
    if _charset_writable(standard, texts):
        if standard == named:
            return None
        if not standard:
            return _OMIT, "names the default repertoire with code extensions: omitted (PS3.3 C.12.1.1.2)"
        value: Any = standard[0] if len(standard) == 1 else standard
        return value, "written in its standard form (PS3.3 C.12.1.1.2)"
    return UTF8, f"not a set the outputs can be written in: written in UTF-8 ({UTF8})"


def _standard_charset(named: list[str]) -> list[str]:
    """``named`` (SpecificCharacterSet's values) in the form PS3.3 C.12.1.1.2 and highdicom expect."""
    if len(named) > 1:
        first = named[0] or "ISO 2022 IR 6"
        return [first, *(v.replace("ISO_IR ", "ISO 2022 IR ") for v in named[1:])]
    if len(named) == 1 and named[0] in _CODE_EXTENSIONS:
        if named[0] == "ISO 2022 IR 6":
            return []
        if named[0] in _MULTI_BYTE:
            return ["ISO 2022 IR 6", named[0]]
        return [named[0].replace("ISO 2022 IR ", "ISO_IR ")]
    return [v for v in named if v]


def _charset_writable(values: list[str], texts: list[str]) -> bool:
    """Whether highdicom accepts ``values`` and every character of ``texts`` encodes in them."""
    if any(v not in _CHARSETS for v in values):
        return False
    if len(values) == 1 and values[0] in _CODE_EXTENSIONS:
        return False
    if len(values) > 1 and (values[0] in _MULTI_BYTE or any(v not in _CODE_EXTENSIONS for v in values)):
        return False
    if not values:  # the default repertoire (ISO-IR 6) is ASCII; pydicom decodes it as Latin-1
        return all(text.isascii() for text in texts)
    try:
        encodings = convert_encodings(values)
    except (LookupError, ValueError):
        return False
    return all(any(_encodes(ch, e) for e in encodings) for text in texts for ch in set(text))


def _encodes(character: str, encoding: str) -> bool:
    try:
        character.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def own_copy(ds: Dataset) -> Dataset:
    """A shallow copy with its own element dictionary: setting an attribute leaves ``ds`` alone.

    ``copy.copy`` alone shares the element dictionary; ``deepcopy`` would copy the pixel data.
    """
    clean = copy.copy(ds)
    clean._dict = {tag: ds.get_item(tag) for tag in ds.keys()}  # noqa: SIM118 - iterating yields elements
    return clean


def _with(ds: Dataset, replacements: dict[str, DataElement | None]) -> Dataset:
    clean = own_copy(ds)
    if "SpecificCharacterSet" in replacements:
        # Text not yet decoded would be decoded with the new set: decode it with the source's first.
        for tag in list(clean._dict):
            if tag != 0x7FE00010:
                try:
                    clean[tag]  # converts the raw element in place, with the source's set
                except Exception:  # a value pydicom cannot convert stays raw; it is not text
                    continue
    for keyword, element in replacements.items():
        if element is None:
            if keyword in clean:
                del clean[keyword]
        else:
            clean[element.tag] = element
    return clean


def _clean_element(ds: Dataset, keyword: str, tag: int) -> tuple[Any, str] | None:
    """``(new value or _OMIT, rule)``, or None when the element is valid as it is."""
    try:
        element = ds[tag]
        vr, value = element.VR, element.value
    except Exception:  # a value pydicom cannot even convert (DS 'abc'): invalid
        return _invalid(keyword, "not readable for its VR")
    if value is None or value == "" or keyword == "StudyInstanceUID":
        return None
    if vr == "SQ":
        if not value and keyword not in _TYPE2:
            return _OMIT, "omitted: an empty sequence (Type 3 needs at least one item)"
        if all(_dataset_valid(item) for item in value):
            return None
        return _OMIT, "omitted: a sequence item holds an invalid value (Type 3)"
    if vr not in _TEXT_VRS | _FORMATTED_VRS | {"PN"}:
        return None
    if keyword == "PatientSex":
        return _sex(value)
    values = list(value) if isinstance(value, MultiValue) else [value]
    texts = [str(v) for v in values]
    if len(texts) > 1 and dictionary_VM(tag) == "1":
        # A backslash inside a single-valued attribute (a PatientID "12\\34"): pydicom reads it as
        # several values, which the outputs would carry as a wrong value multiplicity.
        joined = " ".join(texts)
        again = _clean_texts(keyword, vr, [joined])
        rule = "several values in a single-valued attribute: joined with spaces"
        return (joined, rule) if again is None else (again[0], f"{rule}; {again[1]}")
    return _clean_texts(keyword, vr, texts)


def _clean_texts(keyword: str, vr: str, texts: list[str]) -> tuple[Any, str] | None:
    """The rules of a PN or text or formatted attribute's values (see :func:`_clean_element`)."""
    if vr == "PN":
        fixed = [_person_name(t) for t in texts]
        if fixed != texts:
            return _replace(
                texts, fixed, "cut to 64 characters per component group or control characters removed (PN)"
            )
        if keyword == "PatientName" and "^" not in texts[0]:
            return _replace(
                texts, [f"{texts[0]}^", *texts[1:]], "one component: a trailing '^' added (PS3.5 6.2.1.1)"
            )
        return None
    if vr in _TEXT_VRS:
        return _text(keyword, vr, texts)
    if all(_formatted_valid(vr, t) for t in texts):
        return None
    return _invalid(keyword, f"not a valid {vr}")


def _invalid(keyword: str, why: str) -> tuple[Any, str]:
    if keyword in _TYPE2:
        return "", f"{why}: written empty (Type 2)"
    return _OMIT, f"{why}: omitted (Type 3)"


def _replace(old: list[str], new: list[str], rule: str) -> tuple[Any, str] | None:
    if new == old:
        return None
    return (new[0] if len(new) == 1 else new), rule


def _sex(value: Any) -> tuple[Any, str] | None:
    text = str(value)
    mapped = _SEX.get(text.strip().upper(), "")
    if mapped == text:
        return None
    if mapped:
        return mapped, "spelled as its enumerated value M, F or O (PS3.3 C.7.1.1)"
    return "", "not M, F or O (PS3.3 C.7.1.1): written empty (unknown)"


def _person_name(text: str) -> str:
    return "=".join(_fit_group(group) for group in _CONTROL.sub("", text).split("=")[:3])


def _fit_group(group: str) -> str:
    """At most 5 components and 64 characters: the longest component loses the excess."""
    parts = group.split("^")[:5]
    while (excess := len("^".join(parts)) - 64) > 0:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][: max(0, len(parts[longest]) - excess)]
    return "^".join(parts)


def _text(keyword: str, vr: str, texts: list[str]) -> tuple[Any, str] | None:
    stripped = [_CONTROL.sub("", t).strip() for t in texts]
    if vr in ("SH", "LO"):
        stripped = [t.replace("\\", " ") for t in stripped]
    limit = MAX_VALUE_LEN.get(vr)
    if limit is not None and any(len(t) > limit for t in stripped):
        if keyword in IDENTIFIERS:
            return _invalid(keyword, f"longer than {limit} characters ({vr})")
        stripped = [t[:limit].rstrip() for t in stripped]
        return _replace(texts, stripped, f"cut to {limit} characters ({vr})")
    return _replace(texts, stripped, f"stripped of spaces or characters {vr} does not allow")


def _formatted_valid(vr: str, text: str) -> bool:
    text = text.strip()
    if vr == "DA":
        return _date_valid(text)
    if vr == "TM":
        return _time_valid(text)
    return _value_valid(vr, text)


def _date_valid(text: str) -> bool:
    if not _DA.fullmatch(text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return int(text[:4]) >= 1


def _time_valid(text: str) -> bool:
    match = _TM.fullmatch(text)
    if not match:
        return False
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return hours < 24 and minutes < 60 and seconds <= 60


def _dataset_valid(item: Dataset) -> bool:
    for tag in item.keys():  # noqa: SIM118 - iterating a Dataset yields its elements
        try:
            element = item[tag]
        except Exception:  # a value pydicom cannot convert: invalid
            return False
        if element.VR == "SQ":
            if not all(_dataset_valid(i) for i in element.value or []):
                return False
        elif element.VR in _TEXT_VRS | _FORMATTED_VRS | {"PN"} and element.value not in (None, ""):
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            if not all(_value_valid(element.VR, v) for v in values):
                return False
    return True


def _value_valid(vr: str, value: Any) -> bool:
    if vr in ("DA", "TM"):
        return _date_valid(str(value)) if vr == "DA" else _time_valid(str(value))
    try:
        validate_value(vr, value, config.RAISE)
        if vr == "DT":
            DT(str(value))  # a real date and time: pydicom's check passes '20230230120000'
    except ValueError:
        return False
    return True
