"""DICOM attributes that can identify a patient, their carers or their visit.

A subset of the DICOM PS3.15 Basic Application Level Confidentiality Profile: the
ones real archives carry. fedhosp reports which are *present* (so a hospital knows
what it holds before anything runs) and never reads their values into a log, a
report or a message: they stay on the site's disk.
"""

from __future__ import annotations

import pydicom

TAGS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory",
    "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "ReferringPhysicianName", "PerformingPhysicianName", "PhysiciansOfRecord",
    "RequestingPhysician", "OperatorsName",
)
PRIVATE = "(private tags)"  # vendors' private elements may hold anything, names included


def present(ds: pydicom.Dataset) -> list[str]:
    """Keywords of identifying attributes that hold a non-empty value (the values are not returned)."""
    found = [k for k in TAGS if k in ds and not _empty(ds[k].value)]
    if any(element.tag.is_private for element in ds):
        found.append(PRIVATE)
    return found


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, pydicom.Sequence | list | tuple):
        return len(value) == 0
    return str(value).strip() == ""
