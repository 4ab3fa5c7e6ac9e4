"""`medjax curate`: the curation pipeline (see pipeline.py for the order of stages)."""

import logging


class _DropBeamImportNoise(logging.Filter):
    """Beam's GCP module logs "apitools not found ..." at import when the GCP extra is absent; the
    DirectRunner and local files need none of it, so a newcomer should not read it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_DropBeamImportNoise())
