"""Derivative datasets written beside the raw BIDS dataset (issue 15)."""
