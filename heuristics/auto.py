"""``heuristic: auto`` (the default) is not a heudiconv heuristic any more: this file is a pointer.

A project whose spec says ``heuristic: auto`` (or nothing) has each session converted by
:func:`pacs2bids.convert.convert_session` with dcm2niix, once per session, and every image dcm2niix
writes named by :func:`pacs2bids.convert.classify.classify_session` from dcm2niix's own sidecar (a
vendor-independent account of each series: Siemens, GE, Philips classic and enhanced, Canon,
United Imaging...). The previous heudiconv heuristic re-read vendor headers, missed what the
sidecar already knew, and cost about 12 times dcm2niix alone; it is in the history of this file.

A project's own heudiconv heuristic (``heuristic: path/to/file.py``) still runs through heudiconv:
heudiconv's heuristic format stays the interface for those. The lineage records, for ``auto``,
the sha256 of the classifier and converter sources (see
:func:`pacs2bids.heuristic_path.heuristic_sha256`), so that a change of naming re-converts.
"""

from __future__ import annotations


def infotodict(seqinfo):
    raise RuntimeError(
        "heuristics/auto.py is not a heudiconv heuristic: write 'heuristic: auto' in the spec (pacs2bids then "
        "converts with dcm2niix and names each image from its sidecar), or give the path of a heudiconv "
        "heuristic of your own")
