"""pacs2bids: per-project extraction from a clinical PACS into pseudonymised, validated BIDS datasets."""

__version__ = "0.1.0"
