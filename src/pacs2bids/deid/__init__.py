"""Pseudonymisation to DICOM PS3.15 Annex E, keyed per project (P1-P14).

- :class:`Pseudonymiser`: one series at a time, streaming (:mod:`.series`), each file's elements
  walked by :mod:`.walk` (one rule per VR) with the values changed by :mod:`.values`, its
  identifying values collected by :mod:`.identifiers`;
- :class:`SeriesDeidResult`, the de-identification record and the dry run: :mod:`.record`;
- :mod:`.profile`: Table E.1-1 (2024b) and the private keep rules, as package data;
- :mod:`.keyed`: UIDs, date offsets and key-store key derived from the project secret;
- :mod:`.csa`: the Siemens CSA header decision (kept, scrubbed in place);
- :mod:`.pixels`: burned-in text (OCR with tesseract, masking, quarantine);
- :class:`KeyStore`: the encrypted matching key (:mod:`.keystore`), re-identification and its
  audit log (:mod:`.reidentify`);
- :func:`scan_for_leaks`: the last check before publishing (:mod:`.leakscan`; which strings it
  searches: :mod:`.leakrules`).
"""

from .keystore import KeyStore
from .leakscan import LeakHit, scan_for_leaks
from .record import SeriesDeidResult
from .series import Pseudonymiser

__all__ = ["KeyStore", "LeakHit", "Pseudonymiser", "SeriesDeidResult", "scan_for_leaks"]
