"""The ``format=`` choices of ``sparkme-export`` beyond the dense state dicts of ``sparkme.export``: one small module
per downstream framework, each defining one ``ExportFormat`` that ``sparkme.export.EXPORT_FORMATS`` lists."""

from sparkme.export_formats.base import ExportFormat

__all__ = ["ExportFormat"]
