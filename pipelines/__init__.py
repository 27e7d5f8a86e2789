"""Beam pipelines: raw files -> disjoint per-group shards.

Every module here that imports Beam does so after this file runs, so the filter below is in place first."""

import logging


def _without_gcp_client_warning(record: logging.LogRecord) -> bool:
    """Beam's BigQuery client module logs this on the root logger when it is imported without google-apitools,
    which is optional here (Dataflow users install it): without it the line is only noise."""
    return "apitools not found" not in record.getMessage()


# On the logger itself, not on a handler: the record is dropped whatever handlers exist or come later.
logging.getLogger().addFilter(_without_gcp_client_warning)
