"""Lineage: where each output file came from (see :mod:`pacs2bids.lineage.tables` for the tables
and what they hold, :mod:`pacs2bids.lineage.query` for reading them back)."""

from .query import (find_dataset_root, format_chain, format_instances, instance_counts, instances_of, lineage_of,
                    prov_story, read_instances, read_lineage)
from .tables import (INSTANCE_SCHEMA, LINEAGE_DIR, PARTS_DIR, SCHEMA, InstanceRecord, LineageRecord, instance_records,
                     read_instance_parts, record_lineage, write_instance_part, write_instances, write_run)

__all__ = [
    "INSTANCE_SCHEMA", "LINEAGE_DIR", "PARTS_DIR", "SCHEMA", "InstanceRecord", "LineageRecord", "find_dataset_root",
    "format_chain", "format_instances", "instance_counts", "instance_records", "instances_of", "lineage_of", "prov_story",
    "read_instance_parts", "read_instances", "read_lineage", "record_lineage", "write_instance_part",
    "write_instances", "write_run",
]
