"""The one writer of BIDS files: names from entities (:mod:`.names`), the sessions' files and
``*_scans.tsv`` (:mod:`.layout`, :mod:`.scans`), the top-level files (:mod:`.dataset`) and the
per-series provenance records (:mod:`.provenance`)."""

from pacs2bids.bids.dataset import BIDS_VERSION, fill_phasediff_echo_times, finalise_dataset
from pacs2bids.bids.layout import add_intended_for, clear_session, move_session, place_image
from pacs2bids.bids.names import BidsName, bids_path, build_name, parse_name, session_dir
from pacs2bids.bids.provenance import write_series_provenance
from pacs2bids.bids.scans import acq_time, update_scans, write_scans

__all__ = [
    "BIDS_VERSION", "BidsName", "acq_time", "add_intended_for", "bids_path", "build_name", "clear_session",
    "fill_phasediff_echo_times", "finalise_dataset", "move_session", "parse_name", "place_image",
    "session_dir", "update_scans", "write_scans", "write_series_provenance",
]
