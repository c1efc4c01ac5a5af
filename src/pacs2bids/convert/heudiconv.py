"""Run heudiconv's command line with one check made precise.

heudiconv (1.5) removes the ``*Date``/``*DateTime`` fields from sidecars, then refuses any
sidecar whose text contains the word "Date" anywhere. Pseudonymised DICOM carries the standard
DeidentificationMethodCodeSequence (PS3.16 CID 7050), whose code 113107 means "Retain
Longitudinal Temporal Information Modified Dates Option", and dcm2niix copies it into the
sidecar, so every pseudonymised series would fail. This runner keeps heudiconv's removal of date
fields and refuses a sidecar that still has a date-named key, instead of the bare word. (Values
are not read as dates: dcm2niix's own version, v1.0.YYYYMMDD, would look like one. Identifying
values anywhere are the leak scanner's job, before publishing.) It runs in its own process
(``python -m pacs2bids.heudiconv_runner ARGS``), so nothing is patched in the caller.
"""

from __future__ import annotations

import sys

_DATE_FIELDS = [a + b for a in ("Acquisition", "Study", "Series", "Content") for b in ("DateTime", "Date")]


def _dates_left(obj, path="") -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.endswith(("Date", "DateTime")):
                found.append(f"{path}{k}")
            found += _dates_left(v, f"{path}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _dates_left(v, f"{path}{i}.")
    return found


def tuneup_bids_json_files(json_files: list[str]) -> None:
    """heudiconv's sidecar tune-up, with the date check on keys."""
    from heudiconv import __version__
    from heudiconv.bids import HEUDICONV_VERSION_JSON_KEY
    from heudiconv.utils import load_json, save_json

    for jsonfile in json_files or []:
        data = load_json(jsonfile)
        for field in _DATE_FIELDS:
            data.pop(field, None)
        left = _dates_left(data)
        if left:
            raise ValueError(f"dates left in sidecar {jsonfile}: {', '.join(left)}")
        data[HEUDICONV_VERSION_JSON_KEY] = str(__version__)
        save_json(jsonfile, data)


def main(argv: list[str] | None = None) -> None:
    import heudiconv.convert
    from heudiconv.cli.run import main as heudiconv_main

    heudiconv.convert.tuneup_bids_json_files = tuneup_bids_json_files
    heudiconv_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
