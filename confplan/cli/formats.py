"""The ``--output`` choice most commands share: ``text`` for people, ``json`` for pipelines. (``apply``
adds ``ndjson``: ``confplan.cli.output.Output``.)"""

from __future__ import annotations

import enum


class TextOrJson(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
