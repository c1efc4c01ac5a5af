"""Presentation contexts: the Q/R and Verification SOP classes, transfer syntaxes, and the
storage contexts offered on a C-GET association (PS3.8 9.3.2.2, PS3.4 Annex B.5)."""

from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import build_context
from pynetdicom import sop_class as sc

from ..sopclasses import DEFAULT_STORAGE_CLASSES, IMAGE_CLASSES

FIND = sc.StudyRootQueryRetrieveInformationModelFind
GET = sc.StudyRootQueryRetrieveInformationModelGet
MOVE = sc.StudyRootQueryRetrieveInformationModelMove
ECHO = sc.Verification

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
# Offered in separate presentation contexts (one transfer syntax is accepted per context,
# PS3.8 9.3.2.2) so a compressed instance arrives as stored, without the PACS transcoding it.
COMPRESSED = [
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEG2000,
    JPEGLSNearLossless,
]

_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


def storage_contexts(extra_classes: frozenset[str] = frozenset()) -> list:
    """Presentation contexts for receiving instances (C-GET): every class of
    :data:`~pacs2bids.sopclasses.DEFAULT_STORAGE_CLASSES`, the image classes with every transfer
    syntax, compressed ones included; at most 124 (128 per association,
    PS3.8 9.3.2.2, less the four Q/R and Verification ones).

    ``extra_classes`` (SOP classes the instance-level query announced beyond the defaults,
    private ones included) come right after the image classes, so the cap never drops them
    before the defaults; compressed syntaxes get the room that is left."""
    extra = sorted(set(extra_classes) - DEFAULT_STORAGE_CLASSES)
    contexts = [build_context(uid, UNCOMPRESSED) for uid in list(IMAGE_CLASSES) + extra]
    for uid in sorted(DEFAULT_STORAGE_CLASSES - {str(u) for u in IMAGE_CLASSES}):
        contexts.append(build_context(uid, UNCOMPRESSED))
    # the acceptor picks one syntax per context: big endian, deflate and every compressed
    # syntax get their own context for image classes, so no instance needs transcoding
    for uid in list(IMAGE_CLASSES) + extra:
        for ts in UNCOMPRESSED[1:] + COMPRESSED:
            contexts.append(build_context(uid, [ts]))
    return contexts[: _MAX_CONTEXTS - 4]


def accept_ignored_scp_roles(assoc) -> None:
    """Let the PACS send C-STOREs on storage contexts it accepted while ignoring our SCP/SCU role
    proposal. Strictly (PS3.7 D.3.3.4) an unanswered role item leaves the default roles, and
    pynetdicom then refuses those C-STOREs with 0x0122; Orthanc accepts unknown (private) SOP
    classes that way and sends on them anyway, so its private instances would never arrive
    by C-GET. We proposed the SCP role for every storage context we offered, so taking it is
    what we asked for; an explicit refusal of the role is respected. (pynetdicom has no public
    setter: ``_as_scp`` is pinned by constraints.txt and tests/test_retrieve.py fails if it stops
    working.)"""
    answered = {str(uid) for uid in assoc.acceptor.role_selection}
    for cx in assoc.accepted_contexts:
        uid = str(cx.abstract_syntax)
        if cx.as_scp is False and uid not in answered and uid not in (ECHO, FIND, GET, MOVE):
            cx._as_scp = True
