"""The SOP classes pacs2bids knows, in one place (PS3.4 Annex B.5).

- :data:`IMAGE_CLASSES`: storage classes offered on every C-GET association with every
  transfer syntax, compressed ones included, so their instances arrive as stored;
- :data:`OTHER_CLASSES`: storage classes offered uncompressed (spectroscopy, SR, PR, KO...);
- :data:`DEFAULT_STORAGE_CLASSES`: both, as UID strings (what our storage SCP accepts);
- :func:`is_image_sop_class`: whether dcm2niix turns an instance's pixel data into NIfTI;
- :data:`NOT_PUBLISHED`: classes whose instances pseudonymisation leaves out, with the reason;
- :data:`SECONDARY_CAPTURE_PREFIX`: screenshots, whose pixels are checked for burned-in text;
- :data:`ENHANCED_FORM`: a classic image class and its enhanced (multi-frame) form.
"""

from __future__ import annotations

from pynetdicom import sop_class as sc

IMAGE_CLASSES = [
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.UltrasoundImageStorage,
    sc.UltrasoundMultiFrameImageStorage,
    sc.SecondaryCaptureImageStorage,
]
OTHER_CLASSES = [
    sc.MRSpectroscopyStorage,
    sc.EnhancedMRColorImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.XRayAngiographicImageStorage,
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.RawDataStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.EncapsulatedPDFStorage,
    sc.SegmentationStorage,
    sc.NuclearMedicineImageStorage,
]
DEFAULT_STORAGE_CLASSES = frozenset(str(u) for u in IMAGE_CLASSES + OTHER_CLASSES)

# Families whose pixel data dcm2niix converts (a prefix covers the enhanced and legacy variants)
IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR family
    "1.2.840.10008.5.1.4.1.1.2",  # CT family
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
)
_NON_IMAGE_EXACT = {str(sc.MRSpectroscopyStorage)}  # 1.2.840.10008.5.1.4.1.1.4.2, in the MR family


def is_image_sop_class(uid: str) -> bool:
    """True for the storage SOP classes whose pixel data dcm2niix turns into NIfTI (PS3.4 B.5)."""
    uid = str(uid)
    if uid in _NON_IMAGE_EXACT:
        return False
    return any(uid == p or uid.startswith(p + ".") for p in IMAGE_SOP_PREFIXES)


# Objects never published (their text or payload cannot be pseudonymised safely, or they are no image):
# SOP class UID prefix -> the reason a series' record gives (P12, C4 in REQUIREMENTS.md)
NOT_PUBLISHED = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report or key object selection (P12)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data (C4)"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document (P12)"),
    ("1.2.840.10008.1.3.10", "media storage directory (DICOMDIR)"),
)

# Secondary Capture (1.2.840.10008.5.1.4.1.1.7 and its multi-frame variants): screenshots, burned-in text likely
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


# A classic image storage class (one file per frame) and its enhanced form (frames in one file):
# some scanners (Philips) send a series in both, under one Series Instance UID (dcm_qa_philips_enh).
ENHANCED_FORM = {
    str(sc.MRImageStorage): (str(sc.EnhancedMRImageStorage), "MR"),
    str(sc.CTImageStorage): (str(sc.EnhancedCTImageStorage), "CT"),
    str(sc.PositronEmissionTomographyImageStorage): (str(sc.EnhancedPETImageStorage), "PET"),
}
